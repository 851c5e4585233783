"""Symmetric positive definite block-tridiagonal matrices, batched over leading axes.

A matrix H of T x T blocks of size k, with diagonal blocks ``D[t] = H[t, t]`` (..., T, k, k)
and sub-diagonal blocks ``Lo[t] = H[t+1, t]`` (..., T-1, k, k), is factored as H = L L' with L
block lower bidiagonal: diagonal blocks ``L[t]`` (lower triangular) and sub-diagonal blocks
``E[t] = L[t+1, t]``::

    L[0] L[0]' = D[0],   E[t] = Lo[t] L[t]^-T,   L[t+1] L[t+1]' = D[t+1] - E[t] E[t]'

Solving H x = b is a forward and a backward sweep; the diagonal and first off-diagonal blocks
of H^-1 (the marginal covariances and lag-one cross-covariances of a Gaussian whose precision is
H) follow from the backward recursion, with ``G[t] = -L[t]^-T E[t]'``::

    S[T-1] = (L[T-1] L[T-1]')^-1
    S[t+1, t] = S[t+1] G[t]',   S[t] = L[t]^-T L[t]^-1 + G[t] S[t+1] G[t]'

Each sweep is sequential in t, O(T k^3), and vectorised over the leading (trial) axes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._linalg import sym


class BlockTriCholesky(NamedTuple):
    """Factor of a block-tridiagonal matrix: L (..., T, k, k), E (..., T-1, k, k), and the
    inverses ``Li[t] = L[t]^-1`` (..., T, k, k), formed in one batched call so that the
    sweeps below are matrix products only."""

    L: torch.Tensor
    E: torch.Tensor
    Li: torch.Tensor


def _solve_lower(L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """L^-1 B for lower-triangular L."""
    return torch.linalg.solve_triangular(L, B, upper=False)


def cholesky(D: torch.Tensor, Lo: torch.Tensor) -> BlockTriCholesky:
    """Block Cholesky factor of the SPD block-tridiagonal matrix (D, Lo) (module docstring).

    D and Lo broadcast over their leading axes. Raises ``torch.linalg.LinAlgError`` when the
    matrix is not positive definite.
    """
    T, k = D.shape[-3], D.shape[-1]
    batch = torch.broadcast_shapes(D.shape[:-3], Lo.shape[:-3])
    D = D.expand(*batch, *D.shape[-3:])
    Lo = Lo.expand(*batch, *Lo.shape[-3:])
    Ls = [torch.linalg.cholesky(D[..., 0, :, :])]
    Es = []
    for t in range(T - 1):
        E = _solve_lower(Ls[-1], Lo[..., t, :, :].mT).mT  # Lo[t] L[t]^-T
        Es.append(E)
        Ls.append(torch.linalg.cholesky(D[..., t + 1, :, :] - E @ E.mT))
    L = torch.stack(Ls, -3)
    E = torch.stack(Es, -3) if Es else D.new_zeros((*D.shape[:-3], 0, k, k))
    eye = torch.eye(k, dtype=D.dtype, device=D.device)
    return BlockTriCholesky(L, E, _solve_lower(L, eye.expand(L.shape)))


def solve(factor: BlockTriCholesky, b: torch.Tensor) -> torch.Tensor:
    """x with H x = b; b: (..., T, k)."""
    return solve_matrix(factor, b[..., None])[..., 0]


def solve_matrix(factor: BlockTriCholesky, B: torch.Tensor) -> torch.Tensor:
    """X with H X = B for m right-hand sides; B: (..., T, k, m)."""
    _, E, Li = factor
    T = Li.shape[-3]
    z = [Li[..., 0, :, :] @ B[..., 0, :, :]]
    for t in range(T - 1):
        z.append(Li[..., t + 1, :, :] @ (B[..., t + 1, :, :] - E[..., t, :, :] @ z[-1]))
    x = [None] * T
    x[T - 1] = Li[..., T - 1, :, :].mT @ z[T - 1]
    for t in range(T - 2, -1, -1):
        x[t] = Li[..., t, :, :].mT @ (z[t] - E[..., t, :, :].mT @ x[t + 1])
    return torch.stack(x, -3)


def inverse_blocks(factor: BlockTriCholesky) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal blocks (..., T, k, k) and sub-diagonal blocks ``[H^-1][t+1, t]``
    (..., T-1, k, k) of the inverse (module docstring)."""
    L, E, Li = factor
    T, k = L.shape[-3], L.shape[-1]
    own = Li.mT @ Li  # L[t]^-T L[t]^-1, all t at once
    G = -(Li[..., :-1, :, :].mT @ E.mT)  # -L[t]^-T E[t]', all t at once
    S = [None] * T
    cross = [None] * (T - 1)
    S[T - 1] = own[..., T - 1, :, :]
    for t in range(T - 2, -1, -1):
        cross[t] = S[t + 1] @ G[..., t, :, :].mT
        S[t] = own[..., t, :, :] + G[..., t, :, :] @ cross[t]
    diag = torch.stack(S, -3)
    off = torch.stack(cross, -3) if T > 1 else L.new_zeros((*L.shape[:-3], 0, k, k))
    return sym(diag), off


def matvec(D: torch.Tensor, Lo: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """H v for the block-tridiagonal H = (D, Lo); v: (..., T, k)."""
    out = (D @ v[..., None])[..., 0]
    if v.shape[-2] > 1:
        out[..., 1:, :] += (Lo @ v[..., :-1, :, None])[..., 0]
        out[..., :-1, :] += (Lo.mT @ v[..., 1:, :, None])[..., 0]
    return out


def logdet(factor: BlockTriCholesky) -> torch.Tensor:
    """log det H (...,)."""
    return 2 * torch.log(torch.diagonal(factor.L, dim1=-2, dim2=-1)).sum((-1, -2))
