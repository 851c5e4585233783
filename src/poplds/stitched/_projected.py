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

from dataclasses import dataclass

import numpy as np
import torch

from ._data import RecordingBlock, StitchedData
from .bootstrap import atom_counts, window_atom_sums

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
    c = np.vstack([np.ones(counts.shape[1]), counts])
    w = np.repeat(c, atom_rows, axis=1)[:, :n_time]
    drawn = c @ atom_counts(n_time, atom_rows, lags)
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
        Zf = Z.reshape(T, G * n)
        P = window_atom_sums(Zf[:0], Zf, K, a).reshape(-1, K, G, n, G, n)
        Q = torch.einsum("sgh,asgihj->asij", w, P)  # (A, K, n, n)
        CSC += f[:, :, None, None] * torch.einsum(
            "ba,asij->bsij", torch.as_tensor(dr.counts, device=dev), Q
        )
        # the filters of U: block (g, h) of Mf_s is w_gh(s) X_s, of Mb_s w_hg(s) X_s'
        Mf = torch.einsum("sgh,sij->sgihj", w, Xt).reshape(K, G * n, G * n)
        Mb = torch.einsum("shg,sji->sgihj", w, Xt).reshape(K, G * n, G * n)
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
            # the scored neurons' per-atom lagged sums (their halo rows carried), into every
            # replicate at once: its atom counts times the atoms' sums
            if m_r:
                sums = window_atom_sums(halo[:, cols_t].to(torch.float64), y[:, cols_t], K, a)
                Ss += torch.einsum(
                    "bj,jsxy->bsxy", counts_t[:, t0 // a : t0 // a + sums.shape[0]], sums
                )
        ysq[:, rec.neurons] += dr.factor[:, :1] * sq
        steps[rec.neurons] += T
        sample_sums.append(f[:, :, None, None] * Ss)
        sample_cols.append(cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        variances = np.where(steps > 0, ysq / steps, np.nan)
    return ReplicateData(dD, CSC, variances, sample_sums, sample_cols)
