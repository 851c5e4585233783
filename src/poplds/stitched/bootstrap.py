"""Moving-block bootstrap of a stitched fit: replicate moments that read no data again.

A recording's lagged products ``y[u] y[u-s]'`` are resampled in blocks of consecutive rows,
each row carried with the ``K-1`` rows before it, so every lagged pair of a block stays whole
(the block bootstrap of the K-dimensional embedded series, Kunsch 1989).

*Atoms.* Each recording's ``T_r`` rows are cut into atoms of ``a`` rows; one pass over the data
forms every atom's lagged sums and pair counts (prepared rows: centred, group-sorted)::

    S_rb(s) = sum_(u in atom b, u >= s) y[u] y[u-s]'     (K, N_r, N_r)
    n_b(s)  = #{u in atom b : u >= s}

so ``sum_b S_rb = S_r``, the fit's own lagged sums. A *block* is ``m`` consecutive atoms
starting at any atom (a moving block on the atom grid, ``m = ATOMS_PER_BLOCK`` where memory
allows); a replicate draws ``ceil(A / m)`` block starts uniformly with replacement, so atom b
enters ``c_b`` times, and its moments are

    S*_r(s) = (T_r - s) / (sum_b c_b n_b(s)) * sum_b c_b S_rb(s)

normalised to the recording's own pair count, so that the fit's weights ``1 / n_gh(s)`` stay
valid. Forming a replicate is ``A K N_r^2`` additions; it reads no data.

*Block length* ``l = a m`` per recording, from the data's own autocorrelation: the automatic
block length of Politis & White (2004, corrected by Patton, Politis & White 2009) for a
moving-block bootstrap, computed on each of the recording's three leading fitted latent
projections ``z[t]`` (principal axes of ``C_r' y[t]``) and the largest taken; at least K (the
lags) and at most ``T_r / MIN_BLOCKS``. Reading the projections is the bootstrap's one extra
pass over the data; forming the atoms is the other (none when the data are on the device).

The replicates are centred with the point estimate's means (a replicate's own mean differs by
``O(1/sqrt(T))``, which changes a covariance by ``O(1/T)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._data import RecordingBlock

#: Atoms per moving block (the block starts on any atom); fewer when memory is short.
ATOMS_PER_BLOCK = 4

#: A recording is cut into at least this many blocks.
MIN_BLOCKS = 10


def politis_white(x: np.ndarray) -> float:
    """Automatic block length (rows) of a moving-block bootstrap of the mean of the scalar
    series ``x`` (T,), Politis & White (2004) with the correction of Patton, Politis & White
    (2009)::

        b = (2 G^2 / D)^(1/3) T^(1/3),   G = sum_|k|<=M lam(k/M) |k| R(k),
        D = 4/3 (sum_|k|<=M lam(k/M) R(k))^2

    with ``R`` the autocovariance, ``lam`` the flat-top window (1 up to 1/2, then linear to 0
    at 1) and ``M = 2 m``, ``m`` the first lag after which ``K_N = max(5, log10 T)``
    autocorrelations in a row are below ``2 sqrt(log10(T) / T)``; capped at
    ``min(3 sqrt(T), T / 3)``."""
    x = np.asarray(x, dtype=np.float64)
    T = len(x)
    x = x - x.mean()
    if T < 8 or not np.any(x):
        return 1.0
    kn = max(5, math.ceil(math.log10(T)))
    m_max = math.ceil(math.sqrt(T)) + kn
    m_max = min(m_max, T - 1)
    f = np.fft.rfft(x, 2 * T)
    acv = np.fft.irfft(f * np.conj(f))[: m_max + 1] / T
    rho = acv[1:] / acv[0]
    small = np.abs(rho) < 2.0 * math.sqrt(math.log10(T) / T)
    m_hat = m_max
    for k in range(len(small) - kn + 1):
        if small[k : k + kn].all():
            m_hat = k  # lags k+1 ... k+kn are all small: m = k
            break
    M = min(2 * max(m_hat, 1), m_max)
    k = np.arange(1, M + 1)
    u = k / M
    lam = np.where(u <= 0.5, 1.0, 2.0 * (1.0 - u))
    G = 2.0 * np.sum(lam * k * acv[1 : M + 1])
    g0 = acv[0] + 2.0 * np.sum(lam * acv[1 : M + 1])
    D = 4.0 / 3.0 * g0**2
    if D <= 0:
        return 1.0
    b = (2.0 * G**2 / D) ** (1.0 / 3.0) * T ** (1.0 / 3.0)
    return float(min(max(b, 1.0), 3.0 * math.sqrt(T), T / 3.0))


def block_rows(
    rec: RecordingBlock, Cr: np.ndarray, lags: int, device: torch.device, series: int = 3
) -> int:
    """The block length of recording ``rec`` (module docstring) from its fitted loadings
    ``Cr`` (N_r, n) in its group-sorted column order: one pass for ``Z = Y C_r`` (T_r, n)."""
    C = torch.as_tensor(np.nan_to_num(Cr), dtype=rec.dtype, device=device)
    Z = torch.empty((rec.n_time, C.shape[1]), dtype=torch.float64, device=device)
    for t0, y in rec.chunks(device):
        Z[t0 : t0 + y.shape[0]] = (y @ C).to(torch.float64)
    return block_length(Z.cpu().numpy(), lags, rec.n_time, series)


def block_length(z: np.ndarray, lags: int, n_time: int, series: int = 3) -> int:
    """The block length (module docstring) from a recording's fitted projections ``z``
    (T_r, n): the largest Politis-White length of its ``series`` leading principal axes,
    within ``[lags, max(lags, T_r / MIN_BLOCKS)]``."""
    _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
    lengths = [politis_white(z @ v) for v in vt[:series]]
    cap = max(lags, n_time // MIN_BLOCKS)
    return int(min(cap, max(lags, math.ceil(max(lengths)))))


@dataclass
class AtomMoments:
    """One recording's per-atom lagged sums (module docstring).

    rows: rows per atom (the last may be shorter); S: (A, K, N_r, N_r) float64 in the
    recording's group-sorted order; count: (A, K) pairs each atom holds at each lag;
    per_block: atoms per moving block; n_time: T_r.
    """

    rows: int
    S: torch.Tensor
    count: np.ndarray
    per_block: int
    n_time: int

    @property
    def n_atoms(self) -> int:
        return int(self.S.shape[0])

    def total(self) -> torch.Tensor:
        """``S_r(s) = sum_b S_rb(s)`` (K, N_r, N_r): the recording's own lagged sums."""
        return self.S.sum(0)

    def replicate(self, c: np.ndarray) -> torch.Tensor:
        """``S*_r`` (K, N_r, N_r) for atom counts ``c`` (A,) (module docstring)."""
        return self.replicates(np.asarray(c)[None])[0]

    def replicates(self, c: np.ndarray) -> torch.Tensor:
        """``S*_r`` (B, K, N_r, N_r) of B replicates at once, atom counts ``c`` (B, A): one
        product that reads the atoms once."""
        c = np.asarray(c, dtype=np.float64)
        S = torch.tensordot(torch.as_tensor(c, device=self.S.device), self.S, dims=1)
        pairs = np.maximum(self.n_time - np.arange(S.shape[1]), 1.0)
        drawn = c @ self.count  # (B, K)
        factor = np.divide(pairs, drawn, out=np.zeros_like(drawn), where=drawn > 0)
        return S * torch.as_tensor(factor, device=S.device)[:, :, None, None]


def atom_moments(
    rec: RecordingBlock, lags: int, atom_rows: int, per_block: int, device: torch.device
) -> AtomMoments:
    """Every atom's lagged sums of recording ``rec`` (one pass over its data)."""
    K, n_r, T = lags, len(rec.neurons), rec.n_time
    a = max(int(atom_rows), K - 1, 1)
    n_atoms = math.ceil(T / a)
    S = torch.zeros((n_atoms, K, n_r, n_r), dtype=torch.float64, device=device)
    per_window = max(1, rec.chunk_rows // a)  # windows of whole atoms
    for t0, halo, window in rec.windows(device, halo=K - 1, rows=per_window * a):
        sums = window_atom_sums(halo, window, K, a)
        S[t0 // a : t0 // a + sums.shape[0]] = sums.to(torch.float64)
    count = atom_counts(T, a, K)
    return AtomMoments(a, S, count, per_block, T)


def window_atom_sums(halo: torch.Tensor, window: torch.Tensor, lags: int, a: int) -> torch.Tensor:
    """(J, K, d, d) lagged sums of the atoms of ``a`` rows that a window (W, d) of whole
    atoms holds, ``sum_(u in atom, u >= s) y[u] y[u-s]'``: its ``halo`` (h, d) rows before it
    give the earlier rows of its first ones (h = min(K-1, t0); none before the recording's
    start). In the window's type."""
    W, d = window.shape
    h, J = halo.shape[0], math.ceil(W / a)
    y = torch.cat([halo, window]) if h else window
    cur = window.new_zeros((J * a, d))
    cur[:W] = window
    cur = cur.reshape(J, a, d).transpose(1, 2)  # (J, d, a): the atoms' later rows
    out = window.new_zeros((J, lags, d, d))
    for s in range(lags):
        # the earlier rows u - s of the window's rows u (zero before the recording starts)
        lagged = window.new_zeros((J * a, d))
        skip = max(0, s - h)
        lagged[skip:W] = y[h - s + skip : h + W - s]
        out[:, s] = torch.bmm(cur, lagged.reshape(J, a, d))
    return out


def atom_counts(n_time: int, a: int, lags: int) -> np.ndarray:
    """(A, K): the pairs ``#{u in atom, u >= s}`` each atom of ``a`` rows holds at each lag."""
    u = np.arange(math.ceil(n_time / a) * a).reshape(-1, a)
    return ((u[:, :, None] >= np.arange(lags)) & (u[:, :, None] < n_time)).sum(1)


def resample_counts(n_atoms: int, per_block: int, rng: np.random.Generator) -> np.ndarray:
    """Atom counts ``c`` (A,) of one replicate: ``ceil(A / m)`` moving blocks of ``m`` atoms
    with uniformly drawn starts (module docstring)."""
    m = max(1, min(per_block, n_atoms))
    starts = rng.integers(0, n_atoms - m + 1, size=math.ceil(n_atoms / m))
    c = np.zeros(n_atoms)
    for k in range(m):
        np.add.at(c, starts + k, 1.0)
    return c


def percentile_interval(samples: np.ndarray, level: float, axis: int = 0) -> np.ndarray:
    """``[lo, hi]`` stacked on a new first axis: the ``(1 -+ level) / 2`` quantiles of
    ``samples`` along ``axis`` (NaN replicates ignored), at the positions ``q (B + 1)`` of
    the sorted replicates (Weibull's plotting positions): a new draw from their distribution
    falls between them with probability ``level`` whatever B. (Numpy's default, ``1 + q
    (B - 1)``, holds ``level (B - 1) / (B + 1)`` only: 81 % for a nominal 90 % at B = 20.)"""
    q = np.array([(1 - level) / 2, (1 + level) / 2])
    samples = np.asarray(samples, dtype=np.float64)
    if np.isnan(samples).any():  # slow: only where needed
        return np.nanquantile(samples, q, axis=axis, method="weibull")
    x = np.sort(np.moveaxis(samples, axis, 0), axis=0)  # a sort of B: faster than partitions
    pos = np.clip(q * (x.shape[0] + 1) - 1, 0, x.shape[0] - 1)  # 0-based Weibull positions
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, x.shape[0] - 1)
    frac = (pos - lo).reshape((2,) + (1,) * (x.ndim - 1))
    return x[lo] + frac * (x[hi] - x[lo])


def centred_interval(
    point: float,
    replicates: np.ndarray,
    level: float,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> list[float] | None:
    """``point + [lo, hi]``, the percentile interval of the replicates' deviations from
    their mean: the spread the bootstrap measures, placed at the estimate. Used for scores:
    a replicate's score also carries the replicate's own resampling noise (an error score
    sits above the estimate's in every replicate), which is not the score's uncertainty.
    Clipped to ``bounds`` (a correlation's [-1, 1], an error's [0, inf)). None with fewer
    than two finite replicates or a non-finite point."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r)]
    if len(r) < 2 or point is None or not math.isfinite(point):
        return None
    lo, hi = percentile_interval(r - r.mean(), level)
    return [float(np.clip(point + lo, *bounds)), float(np.clip(point + hi, *bounds))]
