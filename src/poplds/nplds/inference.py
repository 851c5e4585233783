"""The latent-path step of the Poisson LDS: Gaussian posterior of each trial's latents.

Within trial r (bins t = 0..T-1, latents k, neurons N)::

    x[r,0] ~ N(x0, V0),   x[r,t] = A x[r,t-1] + b[r,t] + w,   w ~ N(0, Q)
    y[r,t,i] ~ Poisson(exp(c_i' x[r,t] + o[r,i]))

with ``b[r,t] = B u[r,t]`` (inputs, optional) and the per-trial offset ``o[r,i] = d_i + c_i' h[r]``
(the slow modulator enters as an offset). The prior of a path is Gaussian with mean ``mu``
(``mu[0] = x0``, ``mu[t] = A mu[t-1] + b[t]``) and block-tridiagonal precision ``J``::

    J[0,0] = V0^-1 + A' Q^-1 A,  J[t,t] = Q^-1 + A' Q^-1 A,  J[T-1,T-1] = Q^-1,  J[t+1,t] = -Q^-1 A

The Laplace posterior maximises ``f(x) = sum_t [y_t' eta_t - 1' exp(eta_t)] - (x-mu)' J (x-mu)/2``,
``eta_t = C x_t + o``, by Newton's method: the negative Hessian ``J + blockdiag(C' diag(lam_t) C)``
is block tridiagonal, so a step costs O(R T (N k^2 + k^3)), sequential in t only and vectorised
over trials; the posterior covariance is its inverse (diagonal and lag-one blocks).
With Gaussian emissions ``y_t ~ N(C x_t + o, diag R)`` the same solve is exact conditioning.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _blocktri as bt


class LatentPosterior(NamedTuple):
    """Gaussian posterior of latent paths (float64).

    mean: (R, T, k); cov: (R, T, k, k) marginal covariances; cross: (R, T-1, k, k)
    ``cov(x[t+1], x[t])``; log_joint: (R,) ``f`` at the mode; logdet: (R,) log det of the
    posterior precision; iterations: Newton steps taken.
    """

    mean: torch.Tensor
    cov: torch.Tensor
    cross: torch.Tensor
    log_joint: torch.Tensor
    logdet: torch.Tensor
    iterations: int


def prior_precision(A: torch.Tensor, Q: torch.Tensor, V0: torch.Tensor, T: int):
    """Blocks ``(D (T, k, k), Lo (T-1, k, k))`` of the prior precision J (module docstring)."""
    Qi = torch.linalg.inv(Q)
    AtQiA = A.T @ Qi @ A
    D = (Qi + AtQiA).expand(T, *Q.shape).clone()
    D[-1] = Qi
    D[0] = D[0] - Qi + torch.linalg.inv(V0)
    Lo = (-Qi @ A).expand(max(T - 1, 0), *Q.shape).clone()
    return 0.5 * (D + D.mT), Lo


def prior_mean(A: torch.Tensor, x0: torch.Tensor, b: torch.Tensor | None, R: int, T: int):
    """Prior mean of the paths (R, T, k): ``mu[0] = x0``, ``mu[t] = A mu[t-1] + b[t]``, with
    ``b`` (R, T, k) the input drive ``B u`` or None (``b[0]`` is unused)."""
    k = A.shape[0]
    mu = torch.empty((R, T, k), dtype=A.dtype, device=A.device)
    mu[:, 0] = x0
    for t in range(1, T):
        mu[:, t] = mu[:, t - 1] @ A.T
        if b is not None:
            mu[:, t] += b[:, t]
    return mu


def _prior_term(D, Lo, x, mu):
    v = x - mu
    return -0.5 * (v * bt.matvec(D, Lo, v)).sum((-1, -2))


def gaussian_latents(
    y: torch.Tensor,
    C: torch.Tensor,
    R_noise: torch.Tensor,
    offset: torch.Tensor,
    A: torch.Tensor,
    Q: torch.Tensor,
    x0: torch.Tensor,
    V0: torch.Tensor,
    b: torch.Tensor | None = None,
) -> LatentPosterior:
    """Exact posterior with Gaussian emissions ``y_t ~ N(C x_t + o, diag R_noise)``: one solve
    with precision ``J + C' R^-1 C``. y: (R, T, N); offset: (R, N)."""
    Rn, T, _ = y.shape
    D, Lo = prior_precision(A, Q, V0, T)
    mu = prior_mean(A, x0, b, Rn, T)
    W = C.T @ (C / R_noise[:, None])
    H_D = D + W
    fac = bt.cholesky(H_D.expand(Rn, *H_D.shape), Lo.expand(Rn, *Lo.shape))
    rhs = ((y - offset[:, None, :]) / R_noise) @ C + bt.matvec(D, Lo, mu)
    mean = bt.solve(fac, rhs)
    cov, cross = bt.inverse_blocks(fac)
    resid = y - offset[:, None, :] - mean @ C.T
    log_joint = -0.5 * (resid**2 / R_noise).sum((-1, -2)) + _prior_term(D, Lo, mean, mu)
    return LatentPosterior(mean, cov, cross, log_joint, bt.logdet(fac), 1)


def poisson_latents(
    y: torch.Tensor,
    C: torch.Tensor,
    offset: torch.Tensor,
    A: torch.Tensor,
    Q: torch.Tensor,
    x0: torch.Tensor,
    V0: torch.Tensor,
    b: torch.Tensor | None = None,
    x_init: torch.Tensor | None = None,
    max_iter: int = 50,
    tol: float = 1e-10,
) -> LatentPosterior:
    """Laplace posterior of every trial's path under Poisson emissions (module docstring).

    Newton steps with per-trial step halving until ``f`` rises; stops when every trial's
    step changes ``f`` by less than ``tol * (1 + |f|)``. y: (R, T, N) counts; C: (N, k);
    offset: (R, N) log baseline per trial (``d + C h[r]``).
    """
    Rn, T, _ = y.shape
    D, Lo = prior_precision(A, Q, V0, T)
    mu = prior_mean(A, x0, b, Rn, T)
    x = mu.clone() if x_init is None else x_init.clone()

    def objective(x):
        eta = x @ C.T + offset[:, None, :]
        return (y * eta - torch.exp(eta)).sum((-1, -2)) + _prior_term(D, Lo, x, mu)

    f = objective(x)
    iterations = 0
    for _ in range(max_iter):
        iterations += 1
        lam = torch.exp(x @ C.T + offset[:, None, :])  # (R, T, N)
        grad = (y - lam) @ C - bt.matvec(D, Lo, x - mu)
        W = torch.einsum("rtn,na,nb->rtab", lam, C, C)
        fac = bt.cholesky(D + W, Lo.expand(Rn, *Lo.shape))
        step = bt.solve(fac, grad)
        scale = torch.ones(Rn, dtype=x.dtype, device=x.device)
        for _ in range(30):  # halve each trial's step until its objective does not fall
            x_new = x + scale[:, None, None] * step
            f_new = objective(x_new)
            bad = ~(f_new >= f - 1e-12 * (1 + f.abs()))
            if not bad.any():
                break
            scale = torch.where(bad, scale / 2, scale)
        change = (f_new - f).abs()
        x, f = x_new, f_new
        if torch.all(change <= tol * (1 + f.abs())):
            break
    lam = torch.exp(x @ C.T + offset[:, None, :])
    W = torch.einsum("rtn,na,nb->rtab", lam, C, C)
    fac = bt.cholesky(D + W, Lo.expand(Rn, *Lo.shape))
    cov, cross = bt.inverse_blocks(fac)
    return LatentPosterior(x, cov, cross, f, bt.logdet(fac), iterations)
