"""Exact latent-path posterior of the LDS over trials with Gaussian emissions.

With ``y[r,t] ~ N(C x[r,t] + o[r], diag R)`` and the path prior of
:func:`poplds.nplds.model.path_prior` (information form ``-x'J x / 2 + eta'x``, J block
tridiagonal), the posterior of each trial's path is Gaussian with precision
``J + blockdiag(C' R^-1 C)`` and mean ``(J + C'R^-1 C)^-1 (eta + C' R^-1 (y - o))``: one
block-tridiagonal Cholesky factor per trial, O(T k^3), vectorised over trials. It is the same
solve as the variational path step of the Poisson model (whose site precisions are the expected
rates instead of ``1 / R``), and equals the Kalman filter / RTS smoother.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _blocktri as bt
from .model import PLDSParams, path_prior


class LatentPosterior(NamedTuple):
    """Gaussian posterior of latent paths (float64).

    mean: (R, T, k); cov: (R, T, k, k) marginal covariances; cross: (R, T-1, k, k)
    ``cov(x[t+1], x[t])``; logdet: (R,) log det of the posterior precision.
    """

    mean: torch.Tensor
    cov: torch.Tensor
    cross: torch.Tensor
    logdet: torch.Tensor


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
    """Exact posterior with Gaussian emissions (module docstring).

    y: (R, T, N); C: (N, k); R_noise: (N,); offset: (R, N); A, Q, V0: (k, k); x0: (k,);
    b: (R, T, k) input drive ``B u`` of ``x[t] = A x[t-1] + b[t] + w`` (``b[:, 0]`` unused).
    """
    Rn, T, _ = y.shape
    k = A.shape[0]
    eye = torch.eye(k, dtype=A.dtype, device=A.device)
    p = PLDSParams(
        C=C,
        d=torch.zeros_like(R_noise),
        A=A,
        Q=Q,
        x0=x0,
        V0=V0,
        B=eye if b is not None else None,
    )
    prior = path_prior(p, Rn, T, u=b)
    W = C.T @ (C / R_noise[:, None])
    fac = bt.cholesky(prior.D + W, prior.Lo.expand(Rn, *prior.Lo.shape[1:]))
    rhs = ((y - offset[:, None, :]) / R_noise) @ C + prior.eta
    mean = bt.solve(fac, rhs)
    cov, cross = bt.inverse_blocks(fac)
    return LatentPosterior(mean, cov, cross, bt.logdet(fac))
