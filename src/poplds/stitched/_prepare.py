"""Preparing a stitched fit's data (:func:`prepare_data`): one pass over each recording for
every column's mean, variance and observed fraction, the neurons' observation groups, the
pair counts ``n_gh(s)`` of eq. (1) of ``_data`` and the held-out group pairs, and each
recording's :class:`._data.RecordingBlock` (held on the device when it fits, else streamed)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .._errors import InputError
from .._logging import get_logger
from ._data import (
    RecordingBlock,
    Staging,
    StitchedData,
    _aligned,
    _row_chunks,
    _stat_rows,
    read_one_ahead,
)

log = get_logger()


def observation_groups(
    neurons_per_recording: Sequence[np.ndarray], n_total: int, label: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Group ids (N_total,) of neurons that share the same recordings and the same label, and
    the membership (G, R). Groups are numbered in order of their first neuron; neurons that no
    recording observes get -1."""
    r = len(neurons_per_recording)
    member = np.zeros((n_total, r), dtype=bool)
    for k, idx in enumerate(neurons_per_recording):
        member[idx, k] = True
    observed = member.any(axis=1)
    keys = np.concatenate([member.astype(np.int64), label[:, None].astype(np.int64)], axis=1)
    _, first, inverse = np.unique(keys[observed], axis=0, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    group_of = np.full(n_total, -1, dtype=np.int64)
    group_of[observed] = rank[inverse.ravel()]
    membership = np.zeros((len(first), r), dtype=bool)
    membership[group_of[observed]] = member[observed]
    return group_of, membership


def heldout_labels(
    n_neurons: int, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random labels (N,) and the (3, 3) label pairs held out of the fit.

    Each neuron is labelled A or B with probability ``pi = sqrt(fraction / 2)`` each, else
    "rest" (label 0); the pairs between an A neuron and a B neuron (both orders) are held out:
    a random bipartite block of about ``2 pi^2 = fraction`` of all co-observed pairs. Every
    neuron keeps its pairs with its own label and with "rest" in the fit, and the split adds
    only three label groups per observation pattern, so it costs little.
    """
    held = np.zeros((3, 3), dtype=bool)
    if fraction <= 0:
        return np.zeros(n_neurons, dtype=np.int64), held
    if fraction > 0.5:
        raise InputError("stitched_lds.heldout_fraction", f"must be at most 0.5, got {fraction}")
    pi = np.sqrt(fraction / 2)
    label = rng.choice(3, size=n_neurons, p=[1 - 2 * pi, pi, pi]).astype(np.int64)
    held[1, 2] = held[2, 1] = True
    return label, held


@dataclass(frozen=True)
class RecordingInput:
    """One recording as the fit receives it.

    name: its name; activity: (time, neurons) array-like (numpy, zarr or dask) read in row
    chunks; neurons: (neurons,) positions in the dataset's neuron table.
    """

    name: str
    activity: object
    neurons: np.ndarray


def _column_stats(rec: RecordingInput, rows: int) -> tuple[tuple, np.ndarray, np.ndarray]:
    """One pass over a recording: every column's observed count, sum, mean and sum of squares
    about the mean ``(total, n_obs, mean, ss)`` (columns of the source), and the columns never
    observed and those in which the neuron is constant (they carry no covariance)."""
    n_src = int(rec.activity.shape[1])
    total, n_obs, shifted_sq = np.zeros(n_src), np.zeros(n_src), np.zeros(n_src)
    lo, hi = np.full(n_src, np.inf), np.full(n_src, -np.inf)
    shift = None  # sums of squares about each column's first value: one pass suffices

    def read(span: tuple[int, int], _slot: int) -> np.ndarray:  # the source's type
        return np.asarray(rec.activity[span[0] : span[1]])  # (half the bytes of float64)

    # column ranges summed in parallel (numpy releases the GIL): every column's sums are
    # the same, in the same order, as over the whole rows at once
    threads = max(1, torch.get_num_threads())
    bounds = np.linspace(0, n_src, threads + 1).astype(int)
    ranges = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]

    def clean(y: np.ndarray, sl: slice) -> None:  # rows without a missing value: no masks
        ys = y[:, sl]
        n_obs[sl] += y.shape[0]
        np.minimum(lo[sl], ys.min(0), out=lo[sl])
        np.maximum(hi[sl], ys.max(0), out=hi[sl])
        d = np.subtract(ys, shift[sl], dtype=np.float64)
        shifted_sq[sl] += np.einsum("tj,tj->j", d, d)

    spans = list(_row_chunks(int(rec.activity.shape[0]), rows))
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as workers:
        for y in read_one_ahead(read, spans):
            if shift is None:
                shift = np.nan_to_num(y[0].astype(np.float64))

            def colsum(sl: slice, y=y) -> np.ndarray:  # in float64, as of a float64 copy
                return y[:, sl].sum(0, dtype=np.float64)

            part = np.concatenate(list(workers.map(colsum, ranges)))
            if not np.isnan(part).any():
                total += part
                list(workers.map(lambda sl, y=y: clean(y, sl), ranges))
            else:
                y64 = y.astype(np.float64)
                _masked_stats(y64, shift, total, n_obs, shifted_sq, lo, hi)
    never, constant = n_obs == 0, (n_obs > 0) & (lo == hi)
    if never.all() or (never | constant).all():
        raise InputError(
            rec.name,
            f"every one of its {n_src} neurons is constant or never observed; a recording "
            "needs neurons whose activity varies",
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_src = np.where(never, np.nan, total / n_obs)
        # sum of squares about the mean: sum (y-c)^2 - (sum (y-c))^2 / n
        centred = total - n_obs * shift
        ss_src = np.maximum(shifted_sq - centred**2 / np.maximum(n_obs, 1), 0.0)
    return (total, n_obs, mean_src, ss_src), never, constant


def _masked_stats(y, shift, total, n_obs, shifted_sq, lo, hi) -> None:
    """:func:`_column_stats`'s sums over rows ``y`` (rows, columns) with missing values
    (NaN), added in place."""
    ok = ~np.isnan(y)
    total += np.where(ok, y, 0.0).sum(0)
    n_obs += ok.sum(0)
    shifted_sq += np.where(ok, (y - shift) ** 2, 0.0).sum(0)
    np.minimum(lo, np.where(ok, y, np.inf).min(0), out=lo)
    np.maximum(hi, np.where(ok, y, -np.inf).max(0), out=hi)


def _pair_counts(
    lengths: np.ndarray,
    membership: np.ndarray,
    group_of: np.ndarray,
    label: np.ndarray,
    held_labels: np.ndarray,
    lags: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(pair_count (K, G, G), heldout (G, G))``: time steps at which groups g and h are
    observed together at each lag, 0 for the held-out group pairs, which are marked;
    ``lengths``: (R,) each recording's time steps."""
    n_groups = membership.shape[0]
    group_label = np.zeros(n_groups, dtype=np.int64)
    group_label[group_of[group_of >= 0]] = label[group_of >= 0]
    lengths = np.asarray(lengths, dtype=np.float64)
    s = np.arange(lags, dtype=np.float64)
    per_rec = np.clip(lengths[None, :] - s[:, None], 0, None)  # (K, R)
    mem = membership.astype(np.float64)
    pair_count = np.einsum("gr,sr,hr->sgh", mem, per_rec, mem)
    heldout = held_labels[group_label[:, None], group_label[None, :]] & (pair_count[0] > 0)
    pair_count[:, heldout] = 0.0
    return pair_count, heldout


def _block(
    rec: RecordingInput,
    keep: np.ndarray,
    stats: tuple,
    group_of: np.ndarray,
    lags: int,
    chunk_rows: int | None,
    dtype: torch.dtype,
    staging: Staging,
) -> RecordingBlock:
    """A recording's :class:`RecordingBlock`: its kept columns sorted by group, their means
    and scales (1 / observed fraction), read in chunks of about 32 MB."""
    total_src, n_obs_src, mean_src, _ = stats
    itemsize = torch.empty((), dtype=dtype).element_size()
    neurons_all = np.asarray(rec.neurons, dtype=np.int64)
    order = keep[np.argsort(group_of[neurons_all[keep]], kind="stable")]
    neurons_sorted = neurons_all[order]
    groups, starts = np.unique(group_of[neurons_sorted], return_index=True)
    bounds = list(starts) + [len(neurons_sorted)]
    t_r, n_r = int(rec.activity.shape[0]), len(neurons_sorted)
    rows = chunk_rows or _aligned(
        max(4 * lags, min(8192, int(32e6 // max(1, itemsize * n_r)))), rec.activity
    )
    total, n_obs = total_src[order], n_obs_src[order]
    return RecordingBlock(
        name=rec.name,
        neurons=neurons_sorted,
        groups=groups,
        slices=[slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
        mean=total / n_obs,
        scale=1.0 / (n_obs / t_r),
        n_time=t_r,
        source=rec.activity,
        column_order=order,
        source_mean=mean_src,
        has_missing=bool(np.any(n_obs < t_r)),
        dtype=dtype,
        chunk_rows=rows,
        staging=staging,
    )


def prepare_data(
    recordings: Sequence[RecordingInput],
    n_neurons: int,
    *,
    lags: int,
    device: torch.device,
    heldout_fraction: float = 0.0,
    seed: int = 0,
    max_device_bytes: float | None = None,
    chunk_rows: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> StitchedData:
    """Group neurons, compute means, variances and observed fractions (one pass over each
    recording), then place the prepared data on ``device`` (a second pass) when it fits in
    ``max_device_bytes`` (default: half the free device memory, or 4 GB of host memory),
    else stream it from the source in time chunks at every pass.

    Parameters
    ----------
    recordings: the dataset's recordings (time-major, (T_r, N_r)).
    n_neurons: N_total, the size of the neuron table.
    lags: K; covariances at lags 0..K-1 are matched.
    heldout_fraction: fraction of co-observed neuron pairs kept out of the fit (by random
        neuron labels, see :func:`heldout_labels`).
    seed: seed of the labels and the held-out choice.
    dtype: floating type of the data on the device and of its products (float32 halves
        memory and traffic; accumulation over time chunks is float64 either way).

    Long by choice: it orders the two passes and assembles :class:`StitchedData`; each
    step is a function of its own (:func:`_column_stats`, :func:`_pair_counts`,
    :func:`_block`).
    """
    if lags < 1:
        raise InputError("stitched_lds.lags", f"must be at least 1, got {lags}")
    for rec in recordings:
        t = int(rec.activity.shape[0])
        if t <= lags:
            raise InputError(
                rec.name, f"recording has {t} time steps; lags: {lags} needs more than {lags}"
            )
    itemsize = torch.empty((), dtype=dtype).element_size()
    # first pass: a column never observed, or in which the neuron is constant, is left out
    stats, kept, left_out = [], [], {}
    for rec in recordings:
        rows = chunk_rows or _stat_rows(int(rec.activity.shape[1]), rec.activity)
        st, never, constant = _column_stats(rec, rows)
        neurons = np.asarray(rec.neurons, dtype=np.int64)
        if never.any() or constant.any():
            left_out[rec.name] = {
                "never_observed": neurons[never].tolist(),
                "constant": neurons[constant].tolist(),
            }
        stats.append(st)
        kept.append(np.flatnonzero(~(never | constant)))
    rng = np.random.default_rng([seed, 7])
    label, held_labels = heldout_labels(n_neurons, heldout_fraction, rng)
    group_of, membership = observation_groups(
        [np.asarray(r.neurons)[k] for r, k in zip(recordings, kept, strict=True)],
        n_neurons,
        label,
    )
    n_groups = membership.shape[0]
    group_size = np.bincount(group_of[group_of >= 0], minlength=n_groups)
    lengths = np.array([int(r.activity.shape[0]) for r in recordings], dtype=np.float64)
    pair_count, heldout = _pair_counts(lengths, membership, group_of, label, held_labels, lags)

    if max_device_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            max_device_bytes = 0.5 * free
        else:
            max_device_bytes = 4e9
    total_bytes = sum(
        itemsize * r.activity.shape[0] * len(k) for r, k in zip(recordings, kept, strict=True)
    )
    in_memory = total_bytes <= max_device_bytes

    sum_sq = np.zeros(n_neurons)
    count = np.zeros(n_neurons)
    sum_sq_scaled = np.zeros(n_neurons)
    blocks = []
    staging = Staging()
    for rec, keep, st in zip(recordings, kept, stats, strict=True):
        block = _block(rec, keep, st, group_of, lags, chunk_rows, dtype, staging)
        t_r, n_r = block.n_time, len(block.neurons)
        if in_memory:  # a second pass places the prepared data on the device
            data = torch.empty((t_r, n_r), dtype=dtype, device=device)
            for t0, t1 in _row_chunks(t_r, chunk_rows or _stat_rows(n_r, rec.activity)):
                data[t0:t1] = block.read(t0, t1, device)  # streamed until data is set
            block.data = data
        blocks.append(block)
        ss, n_obs = st[3][block.column_order], st[1][block.column_order]
        sum_sq[block.neurons] += ss
        count[block.neurons] += n_obs
        sum_sq_scaled[block.neurons] += ss * block.scale**2
    with np.errstate(invalid="ignore", divide="ignore"):
        variance = np.where(count > 0, sum_sq / count, np.nan)
        diag_count = np.zeros(n_neurons)
        obs = group_of >= 0
        diag_count[obs] = pair_count[0][group_of[obs], group_of[obs]]
        diag0 = np.where(diag_count > 0, sum_sq_scaled / np.maximum(diag_count, 1), np.nan)
    log.info(
        "%d recordings, %d neurons in %d observation groups, %s on %s",
        len(recordings),
        n_neurons,
        n_groups,
        "held in memory" if in_memory else "streamed from the store",
        device,
    )
    return StitchedData(
        n_neurons=n_neurons,
        recordings=blocks,
        group_of=group_of,
        group_size=group_size,
        membership=membership,
        lags=lags,
        pair_count=pair_count,
        heldout=heldout,
        variance=variance,
        diag0=diag0,
        label=label.astype(np.int64),
        device=device,
        left_out=left_out,
        moment_budget=0.25 * max_device_bytes
        if device.type == "cuda"
        else min(2e9, 0.25 * max_device_bytes),
    )
