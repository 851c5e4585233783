"""Latent trajectories of each recording: Kalman filter and RTS smoother in information form.

For recording r (neurons C_r: (N_r, n), noise R_r: (N_r,)) the model is::

    x[0] ~ N(0, Pi),  x[t+1] = A x[t] + w,  w ~ N(0, Q),  y[t] = C_r x[t] + v,  v ~ N(0, diag R_r)

with ``y`` the recording's centred activity. The data enter the filter only through

    J = C_r' R_r^-1 C_r            (n, n), once per recording
    h[t] = C_r' R_r^-1 y[t]        (T, n), one product with the data

so a step costs O(n^3) whatever N_r is. Filter (P: predicted, F: filtered)::

    F_t = (P_t^-1 + J)^-1,  m_t = F_t (P_t^-1 mp_t + h_t),  mp_t+1 = A m_t,  P_t+1 = A F_t A' + Q

RTS smoother::

    G_t = F_t A' P_t+1^-1,   ms_t = m_t + G_t (ms_t+1 - mp_t+1)
    S_t = F_t + G_t (S_t+1 - P_t+1) G_t'
    cov(x[t+1], x[t] | y) = S_t+1 G_t'

Without missing values the covariances do not depend on the data and converge geometrically;
they are iterated (batched over recordings) only until they stop changing, after which the
mean recursions have constant coefficients, ``m_t = Phi m_t-1 + F h_t`` forwards and
``ms_t = G ms_t+1 + (I - G A) m_t`` backwards, and are solved by a log-depth parallel scan
(``scan_linear``) instead of a Python loop over time. Recordings with missing values (NaN)
take the exact time-varying loop, with ``J_t = C_r' diag(observed_t / R_r) C_r``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .._linalg import sym
from ._data import RecordingBlock


class Posterior(NamedTuple):
    """Smoothed posterior of one recording's latents (float64).

    mean: (T, n); var: (T, n) marginal variances; cov: (T, n, n) or None; cross: (T-1, n, n)
    ``cov(x[t+1], x[t] | y)`` or None (``full=True`` fills both).
    """

    mean: torch.Tensor
    var: torch.Tensor
    cov: torch.Tensor | None = None
    cross: torch.Tensor | None = None


def scan_linear(Phi: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Solve ``v[t] = Phi v[t-1] + u[t]`` (``v[-1] = 0``) for all t: (T, n) -> (T, n).

    Hillis-Steele prefix scan: after the round with offset d, ``v[t]`` holds
    ``sum_{j=t-2d+1..t} Phi^{t-j} u[j]``; log2(T) rounds of one (T, n) x (n, n) product each.
    """
    v = u.clone()
    P = Phi.clone()
    d = 1
    T = u.shape[0]
    while d < T:
        v = torch.cat([v[:d], v[d:] + v[:-d] @ P.T])
        P = P @ P
        d *= 2
    return v


def _converged(new: torch.Tensor, old: torch.Tensor, tol: float) -> bool:
    return bool(
        torch.all(torch.linalg.matrix_norm(new - old) <= tol * torch.linalg.matrix_norm(old))
    )


def steady_covariances(
    A: torch.Tensor, Q: torch.Tensor, Pi: torch.Tensor, J: torch.Tensor, T: int, tol: float
):
    """Filter covariances for a batch of recordings with constant ``J`` (B, n, n).

    Returns ``(P, F, tau)``: predicted and filtered covariances (B, tau+1, n, n) for steps
    0..tau, after which they are constant (``tau <= T - 1``).
    """
    B, n, _ = J.shape
    P = Pi.expand(B, n, n).clone()
    Ps, Fs = [], []
    for t in range(T):
        F = sym(torch.linalg.inv(torch.linalg.inv(P) + J))
        Ps.append(P)
        Fs.append(F)
        if t > 0 and _converged(F, Fs[-2], tol) and _converged(P, Ps[-2], tol):
            break
        P = sym(A @ F @ A.T + Q)
    return torch.stack(Ps, 1), torch.stack(Fs, 1), len(Fs) - 1


def information(
    block: RecordingBlock, C: torch.Tensor, R: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """``h[t] = C' R^-1 y[t]``: (T, n) float64 (one product with the data; missing values
    contribute nothing)."""
    W = (C / R[:, None]).to(block.dtype)
    h = torch.empty((block.n_time, C.shape[1]), dtype=torch.float64, device=device)
    chunks = block.raw_chunks(device) if block.has_missing else block.chunks(device)
    for t0, y in chunks:
        h[t0 : t0 + y.shape[0]] = (torch.nan_to_num(y) @ W).to(torch.float64)
    return h


def smooth_recordings(
    A: np.ndarray,
    Q: np.ndarray,
    Pi: np.ndarray,
    C: np.ndarray,
    R: np.ndarray,
    blocks: Sequence[RecordingBlock],
    device: torch.device,
    *,
    full: bool = False,
    tol: float = 1e-13,
) -> list[Posterior]:
    """Smoothed latents of every recording in one shared latent space.

    ``C`` (N_total, n) and ``R`` (N_total,) are indexed by each block's ``neurons``.
    """
    dt = torch.float64
    At, Qt, Pit = (torch.as_tensor(M, dtype=dt, device=device) for M in (A, Q, Pi))
    out: list[Posterior | None] = [None] * len(blocks)
    regular = [k for k, b in enumerate(blocks) if not b.has_missing]
    if regular:
        Js = []
        for k in regular:
            Cr = torch.as_tensor(C[blocks[k].neurons], dtype=dt, device=device)
            Rr = torch.as_tensor(R[blocks[k].neurons], dtype=dt, device=device)
            Js.append(Cr.T @ (Cr / Rr[:, None]))
        T_max = max(blocks[k].n_time for k in regular)
        P, F, tau = steady_covariances(At, Qt, Pit, torch.stack(Js), T_max, tol)
        for b, k in enumerate(regular):
            blk = blocks[k]
            Cr = torch.as_tensor(C[blk.neurons], dtype=dt, device=device)
            Rr = torch.as_tensor(R[blk.neurons], dtype=dt, device=device)
            h = information(blk, Cr, Rr, device)
            out[k] = _smooth_constant(At, Qt, P[b], F[b], h, full)
    for k, blk in enumerate(blocks):
        if blk.has_missing:
            out[k] = _smooth_missing(At, Qt, Pit, C, R, blk, device, full)
    return [p for p in out if p is not None]


def _expand(seq: torch.Tensor, T: int) -> torch.Tensor:
    """(tau+1, ...) covariances whose last entry holds from then on, as (T, ...)."""
    if seq.shape[0] >= T:
        return seq[:T]
    tail = seq[-1:].expand(T - seq.shape[0], *seq.shape[1:])
    return torch.cat([seq, tail])


def _smooth_constant(A, Q, P, F, h, full):
    """Smoother for one recording with constant J; P, F: (tau+1, n, n) from
    :func:`steady_covariances`; h: (T, n)."""
    T, n = h.shape
    tau = min(P.shape[0], T) - 1
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    # forward means: m_t = F_t P_t^-1 A m_t-1 + F_t h_t (mp_0 = 0)
    m = torch.empty_like(h)
    prev = torch.zeros(n, dtype=h.dtype, device=h.device)
    for t in range(min(tau + 1, T)):
        m[t] = (
            F[t] @ (torch.linalg.solve(P[t], A @ prev) if t else torch.zeros_like(prev))
            + F[t] @ h[t]
        )
        prev = m[t]
    if T > tau + 1:
        Fs, Ps = F[tau], P[tau]
        Phi = Fs @ torch.linalg.solve(Ps, A)
        u = h[tau + 1 :] @ Fs.T
        u[0] = u[0] + Phi @ m[tau]
        m[tau + 1 :] = scan_linear(Phi, u)
    # smoother gains G_t = F_t A' P_t+1^-1, constant for t >= tau
    Fx = _expand(F, T)
    Px = _expand(P, T)
    G = torch.linalg.solve(Px[1:], A @ Fx[:-1]).transpose(-1, -2)  # (T-1, n, n)
    ms = torch.empty_like(m)
    ms[-1] = m[-1]
    # backward: ms_t = G_t ms_t+1 + (I - G_t A) m_t; constant G from t = tau to T-2
    if T > 1:
        lo = min(tau, T - 1)
        if T - 1 > lo:
            Gs = G[lo]
            u = m[lo : T - 1] @ (eye - Gs @ A).T  # rows t = lo..T-2
            u = torch.flip(u, [0])
            u[0] = u[0] + Gs @ ms[-1]
            ms[lo : T - 1] = torch.flip(scan_linear(Gs, u), [0])
        for t in range(lo - 1, -1, -1):
            ms[t] = m[t] + G[t] @ (ms[t + 1] - A @ m[t])
    # smoothed covariances: data independent; S_t converges backwards from the end
    S = [Fx[-1]]
    for t in range(T - 2, -1, -1):
        St = sym(Fx[t] + G[t] @ (S[-1] - Px[t + 1]) @ G[t].T)
        S.append(St)
        if t < T - 2 and t > tau and _converged(St, S[-2], 1e-13):
            # steady from here back to tau: fill, then finish the transient exactly
            rest = t - tau - 1
            S.extend([St] * max(rest, 0))
            for t2 in range(min(tau, t - 1), -1, -1):
                S.append(sym(Fx[t2] + G[t2] @ (S[-1] - Px[t2 + 1]) @ G[t2].T))
            break
    S = torch.stack(S[::-1])
    var = torch.diagonal(S, dim1=-2, dim2=-1).clone()
    if not full:
        return Posterior(ms, var)
    cross = S[1:] @ G.transpose(-1, -2)
    return Posterior(ms, var, S, cross)


def _smooth_missing(A, Q, Pi, C, R, blk, device, full):
    """Exact time-varying smoother for a recording with missing values."""
    dt = torch.float64
    Cr = torch.as_tensor(C[blk.neurons], dtype=dt, device=device)
    Rr = torch.as_tensor(R[blk.neurons], dtype=dt, device=device)
    T, n = blk.n_time, Cr.shape[1]
    outer = (Cr[:, :, None] * Cr[:, None, :] / Rr[:, None, None]).reshape(len(Rr), n * n)
    W = Cr / Rr[:, None]
    J = torch.empty((T, n, n), dtype=dt, device=device)
    h = torch.empty((T, n), dtype=dt, device=device)
    for t0, y in blk.raw_chunks(device):
        y = y.to(dt)
        ok = (~torch.isnan(y)).to(dt)
        J[t0 : t0 + len(y)] = (ok @ outer).reshape(-1, n, n)
        h[t0 : t0 + len(y)] = torch.nan_to_num(y.to(dt)) @ W
    m = torch.empty((T, n), dtype=dt, device=device)
    Fs = torch.empty((T, n, n), dtype=dt, device=device)
    Ps = torch.empty((T, n, n), dtype=dt, device=device)
    P, mp = Pi, torch.zeros(n, dtype=dt, device=device)
    for t in range(T):
        F = sym(torch.linalg.inv(torch.linalg.inv(P) + J[t]))
        m[t] = F @ (torch.linalg.solve(P, mp) + h[t])
        Fs[t], Ps[t] = F, P
        P, mp = sym(A @ F @ A.T + Q), A @ m[t]
    G = torch.linalg.solve(Ps[1:], A @ Fs[:-1]).transpose(-1, -2)
    ms = m.clone()
    S = Fs.clone()
    for t in range(T - 2, -1, -1):
        ms[t] = m[t] + G[t] @ (ms[t + 1] - A @ m[t])
        S[t] = sym(Fs[t] + G[t] @ (S[t + 1] - Ps[t + 1]) @ G[t].T)
    var = torch.diagonal(S, dim1=-2, dim2=-1).clone()
    if not full:
        return Posterior(ms, var)
    return Posterior(ms, var, S, S[1:] @ G.transpose(-1, -2))
