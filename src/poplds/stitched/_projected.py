"""The bootstrap's replicate gradients from low-dimensional projections and one pass: for
recordings whose per-atom lagged sums (``bootstrap``) do not fit in memory.

A replicate's data enter the Gauss-Newton step (``_linear``) only through the gradient of the
reduced loss at the point estimate, which is linear in its lagged sums. With the moving-block
draw written as row weights (row u of recording r enters ``c_b[u]`` times, the count of its
atom; ``f_bs = (T_r - s) / sum_u c_b[u] [u >= s]`` normalises lag s to the recording's own pair
count) and the fitted projections ``z_g[u] = C_g' y_g[u]`` of every group g of the recording,
the three data terms of replicate b (b = 0: the data themselves, c = f = 1) are:

- in ``X_s``: ``C' S~*_s C = f_bs sum_(g,h) w_gh(s) sum_(u >= s) c_b[u] z_g[u] z_h[u-s]'``, formed
  from per-atom lagged sums of the projections (no data);
- in ``C`` (rows i of group g): ``sum_s S~*_s C X_s' + S~*_s' C X_s``, i.e.
  ``sum_u y_i[u] U_bg[u]'`` with

      U_bg[u] = sum_s f_bs (c_b[u] sum_h w_gh(s) X_s z_h[u-s]
                            + c_b[u+s] sum_h w_hg(s) X_s' z_h[u+s]),

  formed window by window from the stored projections and the window's rows: ``T N (B+1) n``
  multiply-adds for all replicates;
- the variances ``v_bi = sum_r f_b0 sum_u c_b[u] y_i[u]^2 / sum_r T_r`` (the same pass).

The projections take one pass (which also sets the block length), the other two terms a
second: the bootstrap reads the data twice. The same pass forms every replicate's lagged sums of up
to :data:`MAX_SCORED` sampled neurons (atom by atom, weighted by the replicates' counts), so
that every replicate is scored as the estimate is (on that subset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._data import RecordingBlock, StitchedData
from .bootstrap import politis_white

#: The replicates' scores are computed on at most this many of the sampled neurons (their
#: lagged sums per replicate: (B+1) K m^2 floats per recording, 40 MB at B = 20, K = 10).
MAX_SCORED = 150


def group_projections(rec: RecordingBlock, Cr: np.ndarray, device: torch.device) -> torch.Tensor:
    """(T_r, G_r, n) float64: ``z_g[u] = C_g' y_g[u]`` of every group of the recording (one
    pass); ``Cr`` (N_r, n) its loadings in its group-sorted order."""
    C = torch.as_tensor(np.nan_to_num(Cr), dtype=rec.dtype, device=device)
    G, n = len(rec.slices), C.shape[1]
    Z = torch.empty((rec.n_time, G, n), dtype=torch.float64, device=device)
    for t0, y in rec.chunks(device):
        for g, sl in enumerate(rec.slices):
            Z[t0 : t0 + y.shape[0], g] = (y[:, sl] @ C[sl]).to(torch.float64)
    return Z


def block_length(Z: torch.Tensor, lags: int, cap: int, series: int = 3) -> int:
    """The Politis-White block length (``bootstrap.block_rows``) from the projections ``Z``
    (T, G, n): on the leading principal axes of ``sum_g z_g = C_r' y``."""
    z = Z.sum(1).cpu().numpy()
    _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
    lengths = [politis_white(z @ v) for v in vt[:series]]
    return int(min(cap, max(lags, math.ceil(max(lengths)))))


def _lagged_atom_sums(Z: torch.Tensor, K: int, a: int) -> tuple[torch.Tensor, np.ndarray]:
    """Per-atom lagged sums of the rows of ``Z`` (T, d): ``(P (A, K, d, d), count (A, K))``,
    ``P[b, s] = sum_(u in atom b, u >= s) Z[u] Z[u-s]'``."""
    T, d = Z.shape
    A = math.ceil(T / a)
    cur = Z.new_zeros((A * a, d))
    cur[:T] = Z
    P = Z.new_zeros((A, K, d, d))
    for s in range(K):
        lagged = Z.new_zeros((A * a, d))
        lagged[s:T] = Z[: T - s]
        P[:, s] = cur.reshape(A, a, d).transpose(1, 2) @ lagged.reshape(A, a, d)
    u = np.arange(A * a).reshape(A, a)
    count = ((u[:, :, None] >= np.arange(K)) & (u[:, :, None] < T)).sum(1)
    return P, count


@dataclass
class RecordingDraws:
    """One recording's replicate draws: ``weights`` (B+1, T_r) row weights (row 0: the data,
    all 1), ``factor`` (B+1, K) lag normalisations ``f_bs``, ``counts`` (B+1, A) atom counts."""

    weights: torch.Tensor
    factor: np.ndarray
    counts: np.ndarray


def draws(
    counts: np.ndarray, atom_rows: int, n_time: int, lags: int, device: torch.device
) -> RecordingDraws:
    """Row weights and lag factors from atom counts (B, A) (the data's own row first)."""
    A = counts.shape[1]
    c = np.vstack([np.ones(A), counts])
    w = np.repeat(c, atom_rows, axis=1)[:, :n_time]
    u = np.arange(A * atom_rows).reshape(A, atom_rows)
    n_as = ((u[:, :, None] >= np.arange(lags)) & (u[:, :, None] < n_time)).sum(1)  # (A, K)
    drawn = c @ n_as
    pairs = np.maximum(n_time - np.arange(lags), 1.0)
    factor = np.divide(pairs, drawn, out=np.zeros_like(drawn), where=drawn > 0)
    return RecordingDraws(torch.as_tensor(w, device=device), factor, c)


@dataclass
class ReplicateData:
    """What the replicates' gradients need (module docstring), b = 0 the data themselves:
    ``dD_dC`` (B+1, N_total, n) the data term's gradient in C; ``CSC`` (B+1, K, n, n) the
    weighted ``C' S~_s C``; ``variances`` (B+1, N_total) (NaN where never observed); and the
    scored subset's lagged sums per recording, ``sample_sums[r]`` (B+1, K, m_r, m_r) with
    ``sample_cols[r]`` their columns in the recording."""

    dD_dC: torch.Tensor
    CSC: torch.Tensor
    variances: np.ndarray
    sample_sums: list[torch.Tensor]
    sample_cols: list[np.ndarray]


def replicate_data(
    data: StitchedData,
    C: np.ndarray,
    X: np.ndarray,
    projections: list[torch.Tensor],
    recording_draws: list[RecordingDraws],
    atom_rows: list[int],
    scored: np.ndarray,
) -> ReplicateData:
    """The replicates' data terms (module docstring): the second pass over the data.
    ``C`` (N_total, n), ``X`` (K, n, n): the estimate; ``projections[r]`` (T_r, G_r, n);
    ``scored``: dataset positions of the neurons whose lagged sums every replicate keeps."""
    dev, K = data.device, data.lags
    n = C.shape[1]
    Xt = torch.as_tensor(X, device=dev)
    w_all = data.weights(dev)
    B1 = recording_draws[0].weights.shape[0]
    dD = torch.zeros((B1, data.n_neurons, n), dtype=torch.float64, device=dev)
    CSC = torch.zeros((B1, K, n, n), dtype=torch.float64, device=dev)
    ysq = np.zeros((B1, data.n_neurons))
    steps = np.zeros(data.n_neurons)
    sample_sums, sample_cols = [], []
    for rec, Z, dr, a in zip(data.recordings, projections, recording_draws, atom_rows, strict=True):
        T, G = Z.shape[0], Z.shape[1]
        g = torch.as_tensor(rec.groups, device=dev)
        w = w_all[:, g][:, :, g]  # (K, G, G)
        f = torch.as_tensor(dr.factor, device=dev)  # (B1, K)
        c = dr.weights  # (B1, T)
        # C' S~_s C from the projections' per-atom sums
        P, _ = _lagged_atom_sums(Z.reshape(T, G * n), K, a)
        P = P.reshape(P.shape[0], K, G, n, G, n)
        Q = torch.einsum("sgh,asgihj->asij", w, P)  # (A, K, n, n)
        CSC += f[:, :, None, None] * torch.einsum(
            "ba,asij->bsij", torch.as_tensor(dr.counts, device=dev), Q
        )
        # the filters of U: block (g, h) of Mf_s is w_gh(s) X_s, of Mb_s w_hg(s) X_s'
        Mf = torch.einsum("sgh,sij->sgihj", w, Xt).reshape(K, G * n, G * n)
        Mb = torch.einsum("shg,sji->sgihj", w, Xt).reshape(K, G * n, G * n)
        Zf = Z.reshape(T, G * n)
        cols = np.flatnonzero(np.isin(rec.neurons, scored))
        m_r = len(cols)
        cols_t = torch.as_tensor(cols, device=dev)
        counts_t = torch.as_tensor(dr.counts, device=dev)  # (B1, A)
        Ss = torch.zeros((B1, K, m_r, m_r), dtype=torch.float64, device=dev)
        sq = np.zeros((B1, len(rec.neurons)))  # sum_u c_b[u] y[u]^2
        per_window = max(1, rec.chunk_rows // a)
        for t0, halo, window in rec.windows(dev, halo=K - 1, rows=per_window * a):
            rows = window.shape[0]
            t1 = t0 + rows
            U = torch.zeros((rows, B1, G * n), dtype=torch.float64, device=dev)
            for s in range(K):
                # forward: rows u >= s, from z[u - s]
                lo = max(t0, s)
                if lo < t1:
                    zf = Zf[lo - s : t1 - s] @ Mf[s].T  # (rows', G n)
                    U[lo - t0 :] += (f[:, s] * c[:, lo:t1].T)[:, :, None] * zf[:, None, :]
                # backward: rows u with u + s < T, from z[u + s]
                hi = min(t1, T - s)
                if hi > t0:
                    zb = Zf[t0 + s : hi + s] @ Mb[s].T
                    U[: hi - t0] += (f[:, s] * c[:, t0 + s : hi + s].T)[:, :, None] * zb[:, None, :]
            y = window.to(torch.float64)
            for gi, sl in enumerate(rec.slices):
                Ug = U[:, :, gi * n : (gi + 1) * n].reshape(rows, B1 * n)
                contrib = (y[:, sl].T @ Ug).reshape(-1, B1, n).transpose(0, 1)
                dD[:, rec.neurons[sl]] += contrib
            sq += (c[:, t0:t1].to(torch.float64) @ y**2).cpu().numpy()
            # the scored neurons' per-atom lagged sums (their halo rows carried)
            if m_r:
                ys = torch.cat([halo, window])[:, cols_t].to(torch.float64)
                h = halo.shape[0]
                J = math.ceil(rows / a)
                cur = ys.new_zeros((J * a, m_r))
                cur[:rows] = ys[h:]
                atom_sums = ys.new_zeros((J, K, m_r, m_r))
                for s in range(K):
                    lagged = ys.new_zeros((J * a, m_r))
                    skip = max(0, s - h)
                    lagged[skip:rows] = ys[h - s + skip : h + rows - s]
                    atom_sums[:, s] = cur.reshape(J, a, m_r).transpose(1, 2) @ lagged.reshape(
                        J, a, m_r
                    )
                # into every replicate at once: its atom counts times the atoms' sums
                c_j = counts_t[:, t0 // a : t0 // a + J]
                Ss += torch.einsum("bj,jsxy->bsxy", c_j, atom_sums)
        ysq[:, rec.neurons] += dr.factor[:, :1] * sq
        steps[rec.neurons] += T
        sample_sums.append(f[:, :, None, None] * Ss)
        sample_cols.append(cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        variances = np.where(steps > 0, ysq / steps, np.nan)
    return ReplicateData(dD, CSC, variances, sample_sums, sample_cols)
