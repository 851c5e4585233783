"""Numerics shared by the N-PLDS steps: Gaussian KL, GP site posteriors, small quadratic
forms, damping by step halving and conjugate gradients. No model knowledge here."""

from __future__ import annotations

import contextlib
import contextvars
from collections import Counter
from collections.abc import Callable, Iterator

import torch

from .._linalg import sym

_SKIPPED: contextvars.ContextVar[Counter | None] = contextvars.ContextVar("skipped", default=None)
_GUARDS: contextvars.ContextVar[Counter | None] = contextvars.ContextVar("guards", default=None)


@contextlib.contextmanager
def _counting(var: contextvars.ContextVar[Counter | None]) -> Iterator[Counter]:
    counter: Counter = Counter()
    token = var.set(counter)
    try:
        yield counter
    finally:
        var.reset(token)


def counting_skipped_steps() -> contextlib.AbstractContextManager[Counter]:
    """Count, inside the block, the steps that :func:`skipped` records: numerical failures
    (a Cholesky factor that does not exist) after which a step keeps the current value."""
    return _counting(_SKIPPED)


def counting_guards() -> contextlib.AbstractContextManager[Counter]:
    """Count, inside the block, how often each numerical guard changed a result (a
    covariance's eigenvalues raised to their floor: ``psd_floor``)."""
    return _counting(_GUARDS)


def active_guards() -> Counter | None:
    """The counter of :func:`counting_guards` in effect, if any."""
    return _GUARDS.get()


def skipped(step: str) -> None:
    """Record that ``step`` was skipped after a numerical failure (counted by
    :func:`counting_skipped_steps`; reported in the fit's result and ``metrics.json``)."""
    counter = _SKIPPED.get()
    if counter is not None:
        counter[step] += 1


def gaussian_kl(
    m: torch.Tensor, S: torch.Tensor, mu: torch.Tensor, K: torch.Tensor
) -> torch.Tensor:
    """KL(N(m, S) || N(mu, K)) for batches: m, mu (J, R); S, K (J, R, R) -> (J,).

    ``KL = [tr(K^-1 S) + (m-mu)' K^-1 (m-mu) - R + log det K - log det S] / 2``.
    """
    Lk = torch.linalg.cholesky(K)
    Ls = torch.linalg.cholesky(S)
    a = torch.linalg.solve_triangular(Lk, (m - mu)[..., None], upper=False)
    B = torch.linalg.solve_triangular(Lk, Ls, upper=False)
    logdet_k = 2 * torch.log(torch.diagonal(Lk, dim1=-2, dim2=-1)).sum(-1)
    logdet_s = 2 * torch.log(torch.diagonal(Ls, dim1=-2, dim2=-1)).sum(-1)
    R = m.shape[-1]
    return 0.5 * ((B**2).sum((-1, -2)) + (a**2).sum((-1, -2)) - R + logdet_k - logdet_s)


def site_covariance(K: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(K^-1 + diag w)^-1`` for K (..., R, R), w (..., R) >= 0, formed as
    ``K - K W^1/2 (I + W^1/2 K W^1/2)^-1 W^1/2 K``: no K^-1, and the matrix factored has
    eigenvalues >= 1 however ill-conditioned K is (the GP posterior covariance of Gaussian
    site terms with precisions w)."""
    sw = torch.sqrt(torch.clamp(w, min=0))
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    Lb = torch.linalg.cholesky(eye + sw[..., :, None] * K * sw[..., None, :])
    KW = K * sw[..., None, :]
    S = K - KW @ torch.cholesky_solve(KW.mT, Lb)
    return sym(S)


def outer_flat(X: torch.Tensor) -> torch.Tensor:
    """(..., a) -> (..., a*a) rows of x x'."""
    return (X[..., :, None] * X[..., None, :]).flatten(-2)


def quad_diag(C: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``c_i' S[...] c_i`` for every neuron: C (N, k), S (..., k, k) -> (..., N), as one matmul
    (no (..., N, k) intermediate)."""
    k = C.shape[1]
    return S.reshape(-1, k * k) @ outer_flat(C).T if S.ndim > 2 else outer_flat(C) @ S.flatten()


def weighted_gram(w: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``C' diag(w[...]) C`` for w (..., N) -> (..., k, k), as one matmul."""
    k = C.shape[1]
    return (w @ outer_flat(C)).reshape(*w.shape[:-1], k, k)


def halve_until(
    old: torch.Tensor,
    propose: Callable[[torch.Tensor], tuple[torch.Tensor, object]],
    n: int,
    like: torch.Tensor,
    tries: int = 20,
) -> tuple[torch.Tensor, object, torch.Tensor]:
    """Damped step with a separable objective: ``propose(rho) -> (objective (n,), payload)``
    for per-item step sizes rho (n,). Halves rho where the objective would fall below
    ``old``; items that never improve get rho = 0. Returns (objective, payload, rho)."""
    rho = torch.ones(n, dtype=like.dtype, device=like.device)
    for _ in range(tries):
        value, payload = propose(rho)
        ok = torch.isfinite(value) & (value >= old - 1e-12 * (1 + old.abs()))
        if bool(ok.all()):
            return value, payload, rho
        rho = torch.where(ok, rho, rho / 2)
    rho = torch.where(ok, rho, torch.zeros_like(rho))
    value, payload = propose(rho)
    return value, payload, rho


def kernel_solve(Lk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K_j^-1 v_j for every dimension: Lk (J, R, R) Cholesky factors, v (R, J) -> (R, J)."""
    return torch.cholesky_solve(v.T[..., None], Lk)[..., 0].T


def conjugate_gradients(apply, precond, b: torch.Tensor, tol: float = 1e-10, max_iter: int = 200):
    """Preconditioned conjugate gradients for an SPD operator on tensors shaped like b."""
    x = torch.zeros_like(b)
    r = b.clone()
    z = precond(r)
    d = z.clone()
    rz = (r * z).sum()
    bnorm = b.norm().clamp(min=1e-300)
    for _ in range(max_iter):
        Ad = apply(d)
        alpha = rz / (d * Ad).sum()
        x = x + alpha * d
        r = r - alpha * Ad
        if r.norm() <= tol * bnorm:
            break
        z = precond(r)
        rz_new = (r * z).sum()
        d = z + (rz_new / rz) * d
        rz = rz_new
    return x


def site_posterior(K: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """``S = (K^-1 + diag w)^-1`` (:func:`site_covariance`) and ``m = S b`` per dimension
    (K (J, R, R); w, b (J, R))."""
    S = site_covariance(K, w)
    return (S @ b[..., None])[..., 0], S
