"""NWB reader: ``RoiResponseSeries`` (calcium imaging) and ``units`` (spike times).

Files are opened with pynwb in read mode; the big arrays stay h5py datasets and are wrapped in
dask, so a recording larger than memory is read chunk by chunk while the store is written.

Spike times are binned on the grid ``edges[k] = t0 + k * bin_size_s``; bin ``k`` counts spikes
with ``edges[k] <= t < edges[k+1]``. A bin that is not wholly inside one of a unit's
``obs_intervals`` is missing (NaN), never zero. With trials, bin ``k`` of trial ``r`` is
``[w_r + k * bin, w_r + (k+1) * bin)`` where ``w_r`` is the trial's window start, and a bin
(or frame) not wholly inside the trial's own ``[start_time, stop_time)`` is missing: trials of
unequal length are kept whole, padded with NaN, and a window that runs past a trial's end
never takes data from between trials (:func:`poplds.sources._base.trial_windows`).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import h5py
import numpy as np

from .._errors import InputError
from ._base import (
    Recording,
    RecordingSpec,
    TrialOptions,
    as_float32,
    as_id_strings,
    time_chunk_rows,
    trial_windows,
)

#: ``series:`` value that selects the units table when a file has both kinds of data.
UNITS = "units"


def _open(path: Path) -> tuple[Any, Any]:
    """Open an NWB file read-only; corrupt or truncated files raise :class:`InputError`."""
    try:
        ok = h5py.is_hdf5(path)
    except OSError as exc:
        raise InputError(path, f"cannot open file: {exc}") from exc
    if not ok:
        raise InputError(path, "not an HDF5/NWB file (wrong format, corrupt or truncated)")
    from pynwb import NWBHDF5IO

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            io = NWBHDF5IO(str(path), mode="r", load_namespaces=True)
            nwb = io.read()
    except Exception as exc:  # h5py/hdmf raise many types for damaged files
        raise InputError(
            path, f"cannot be read as NWB (corrupt or truncated file?): {type(exc).__name__}: {exc}"
        ) from exc
    return io, nwb


def _roi_series(nwb: Any) -> dict[str, Any]:
    """All ``RoiResponseSeries`` of a file as ``{module/name: series}``: processing modules in
    name order first (containers such as ``Fluorescence`` searched inside), then acquisition."""
    from pynwb.ophys import RoiResponseSeries

    found: dict[str, Any] = {}

    def visit(prefix: str, obj: Any) -> None:
        if isinstance(obj, RoiResponseSeries):
            found[f"{prefix}/{obj.name}"] = obj
        elif hasattr(obj, "roi_response_series"):
            for key in sorted(obj.roi_response_series):
                visit(prefix, obj.roi_response_series[key])

    for mod_name in sorted(nwb.processing):
        module = nwb.processing[mod_name]
        for key in sorted(module.data_interfaces):
            visit(mod_name, module.data_interfaces[key])
    for key in sorted(nwb.acquisition):
        visit("acquisition", nwb.acquisition[key])
    return found


def read_nwb(
    spec: RecordingSpec,
    *,
    bin_size_s: float,
    trials: TrialOptions | None = None,
    chunk_mb: float = 4.0,
) -> Recording:
    """Read one NWB file as a :class:`Recording`.

    Parameters
    ----------
    spec: the recording's configuration (``series`` picks a ``RoiResponseSeries`` by name, or
        ``"units"``).
    bin_size_s: bin width for spike counts (ignored for imaging series).
    trials: cut ``(trials, time, neurons)`` out of the ``trials`` table when given.
    chunk_mb: target size of one lazy read chunk.
    """
    path = spec.path
    io, nwb = _open(path)
    try:
        series = _roi_series(nwb)
        has_units = nwb.units is not None
        if spec.series == UNITS or (spec.series is None and has_units and not series):
            if not has_units:
                raise InputError(path, "series: units was asked for but the file has no units")
            rec = _read_units(spec, nwb, bin_size_s, trials, chunk_mb)
        elif spec.series is not None:
            matches = [k for k in series if k == spec.series or k.split("/", 1)[1] == spec.series]
            if not matches:
                raise InputError(
                    path,
                    f"no RoiResponseSeries named {spec.series!r}; the file has "
                    f"{sorted(series) or 'none'}" + (" and a units table" if has_units else ""),
                )
            rec = _read_roi_series(spec, nwb, matches[0], series[matches[0]], trials, chunk_mb)
        elif series and has_units:
            raise InputError(
                path,
                f"the file has both RoiResponseSeries {sorted(series)} and a units table; "
                "set 'series:' to one of them or to 'units'",
            )
        elif series:
            key = next(iter(series))
            rec = _read_roi_series(spec, nwb, key, series[key], trials, chunk_mb)
        else:
            raise InputError(path, "the file has neither a RoiResponseSeries nor a units table")
    except BaseException:
        io.close()
        raise
    rec.closers.append(io.close)
    return rec


def trial_columns(nwb: Any) -> dict[str, np.ndarray]:
    """The trials table's other numeric one-value-per-trial columns, float64 (event times,
    conditions): what ``nplds.inputs`` turns into regressors."""
    table = nwb.trials
    out = {}
    for name in table.colnames:
        if name in ("start_time", "stop_time", "trial_number"):
            continue
        try:
            values = np.asarray(table[name].data[:])
        except (TypeError, ValueError):  # ragged or object columns are not regressors
            continue
        if values.ndim == 1 and (
            np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_
        ):
            out[name] = values.astype(np.float64)
    return out


def _trial_table(path: Path, nwb: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start_time, stop_time, trial numbers) of the trials table."""
    table = nwb.trials
    if table is None:
        raise InputError(path, "trials: true but the file has no trials table")
    starts = np.asarray(table["start_time"].data[:], dtype=np.float64)
    stops = np.asarray(table["stop_time"].data[:], dtype=np.float64)
    if "trial_number" in table.colnames:
        numbers = np.asarray(table["trial_number"].data[:])
        if not np.issubdtype(numbers.dtype, np.integer):
            raise InputError(path, f"trials.trial_number must be integers, not {numbers.dtype}")
    else:
        numbers = np.arange(len(starts))
    return starts, stops, numbers.astype(np.int64)


def _read_roi_series(
    spec: RecordingSpec,
    nwb: Any,
    key: str,
    series: Any,
    trials: TrialOptions | None,
    chunk_mb: float,
) -> Recording:
    path = spec.path
    data = series.data
    if not hasattr(data, "shape") or len(data.shape) not in (1, 2):
        raise InputError(path, f"series {key}: data must be (time, rois), got {data.shape}")
    rois = np.asarray(series.rois.data[:], dtype=np.int64)
    table = series.rois.table
    if "neuron_id" in table.colnames:
        table_ids = as_id_strings(table["neuron_id"].data[:])
    else:
        table_ids = as_id_strings(table.id.data[:])
    if rois.size and (rois.min() < 0 or rois.max() >= len(table_ids)):
        raise InputError(path, f"series {key}: rois point outside the ROI table")
    ids = table_ids[rois]
    n_time = data.shape[0]
    n_rois = data.shape[1] if len(data.shape) == 2 else 1
    if n_rois != len(ids):
        raise InputError(
            path, f"series {key}: {n_rois} data columns but {len(ids)} rois; ids do not match"
        )
    dtype = np.dtype(data.dtype)
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise InputError(path, f"series {key}: data is not numeric (dtype {dtype})")
    if series.rate is not None:
        rate = float(series.rate)
        t0 = float(series.starting_time or 0.0)
    else:
        stamps = np.asarray(series.timestamps[:], dtype=np.float64)
        if stamps.size < 2:
            raise InputError(path, f"series {key}: needs at least two timestamps")
        dt = np.diff(stamps)
        rate = float(1.0 / np.median(dt))
        if np.any(np.abs(dt * rate - 1.0) > 0.01):
            raise InputError(path, f"series {key}: timestamps are not regularly spaced (within 1%)")
        t0 = float(stamps[0])
    rows = time_chunk_rows(n_rois, 4, chunk_mb)
    x = da.from_array(data, chunks=(rows,) if len(data.shape) == 1 else (rows, -1), lock=True)
    if x.ndim == 1:
        x = x[:, None]
    if not np.issubdtype(dtype, np.number):
        x = x.astype(np.float32)
    conversion = float(getattr(series, "conversion", 1.0) or 1.0)
    offset = float(getattr(series, "offset", 0.0) or 0.0)
    if conversion != 1.0 or offset != 0.0:
        x = x.astype(np.float64) * conversion + offset
    x = as_float32(x, spec.path)
    attrs: dict[str, Any] = {"series": key, "t_start_s": t0, "unit": str(series.unit)}
    trial_ids = None
    if trials is not None:
        starts, stops, trial_ids = _trial_table(path, nwb)
        win = trial_windows(path, starts, stops, trials)
        n_frames = int(math.floor(win.duration * rate + 1e-6))
        if n_frames < 1:
            raise InputError(path, f"trial window of {win.duration} s holds no frame at {rate} Hz")
        first = np.rint((win.start - t0) * rate).astype(np.int64)
        # frame j of trial r is observed when it lies wholly inside the trial
        frame_t = t0 + (first[:, None] + np.arange(n_frames)[None, :]) / rate  # (R, frames)
        tol = 1e-6 / rate
        inside = (frame_t >= win.lo[:, None] - tol) & (frame_t + 1 / rate <= win.hi[:, None] + tol)
        blocks = []
        for r, i0 in enumerate(first):
            idx = i0 + np.flatnonzero(inside[r])
            if idx.size and (idx[0] < 0 or idx[-1] >= n_time):
                raise InputError(
                    path,
                    f"trial {trial_ids[r]} (frames {idx[0]}..{idx[-1] + 1}) extends outside the "
                    f"recording (frames 0..{n_time})",
                )
            i0 = int(i0)
            a, b = max(i0, 0), min(i0 + n_frames, n_time)
            if b > a:  # frames outside the recording are padding, and outside the trial
                pad = ((a - i0, i0 + n_frames - b), (0, 0))
                block = da.pad(x[a:b], pad, constant_values=np.nan)
            else:
                block = da.full((n_frames, n_rois), np.nan, dtype=np.float32)
            blocks.append(da.where(da.from_array(inside[r][:, None]), block, np.nan))
        x = da.stack(blocks).astype(np.float32)
        attrs.update(
            trial_window_start_s=win.start.tolist(),
            trial_duration_s=n_frames / rate,
            trial_crop=bool(trials.crop),
            trial_time_kept_fraction=win.kept,
        )
    return Recording(
        name=spec.display_name,
        activity=x,
        neuron_ids=ids,
        rate_hz=rate,
        kind="traces",
        source=path,
        trial_ids=trial_ids,
        trial_columns=trial_columns(nwb) if trial_ids is not None else None,
        attrs=attrs,
    )


def _ragged(path: Path, column: Any, what: str) -> list[np.ndarray]:
    """Split a ragged NWB column (VectorIndex over VectorData) into one array per row."""
    ends = np.asarray(column.data[:], dtype=np.int64)
    flat = np.asarray(column.target.data[:])
    if ends.size and (np.any(np.diff(ends) < 0) or ends[-1] > len(flat)):
        raise InputError(path, f"units.{what} index is inconsistent with its data")
    starts = np.concatenate([[0], ends[:-1]])
    return [flat[a:b] for a, b in zip(starts, ends, strict=True)]


def count_spikes(spikes: list[np.ndarray], edges: np.ndarray) -> np.ndarray:
    """Spike counts ``(len(edges) - 1, units)``: ``count[k, u] = #{t in spikes[u]:
    edges[k] <= t < edges[k+1]}``; ``spikes[u]`` must be sorted."""
    out = np.empty((len(edges) - 1, len(spikes)), dtype=np.float32)
    for u, st in enumerate(spikes):
        out[:, u] = np.diff(np.searchsorted(st, edges, side="left"))
    return out


def mask_unobserved(counts: np.ndarray, intervals: list[np.ndarray] | None, edges: np.ndarray):
    """Set to NaN, in place, every bin not wholly inside one of the unit's intervals (K, 2)."""
    if intervals is None:
        return counts
    eps = 1e-6 * float(edges[1] - edges[0]) if len(edges) > 1 else 0.0
    for u, iv in enumerate(intervals):
        observed = np.zeros(len(edges) - 1, dtype=bool)
        for a, b in iv:
            lo = np.searchsorted(edges, a - eps, side="left")
            hi = np.searchsorted(edges, b + eps, side="right") - 1
            if hi > lo:
                observed[lo:hi] = True
        counts[~observed, u] = np.nan
    return counts


def _read_units(
    spec: RecordingSpec,
    nwb: Any,
    bin_size_s: float,
    trials: TrialOptions | None,
    chunk_mb: float,
) -> Recording:
    path = spec.path
    units = nwb.units
    if len(units) == 0:
        raise InputError(path, "empty recording: the units table has no units")
    if "spike_times" not in units.colnames:
        raise InputError(path, "the units table has no spike_times column")
    if not bin_size_s > 0:
        raise InputError(path, f"bin_size_s must be positive, got {bin_size_s}")
    if "neuron_id" in units.colnames:
        ids = as_id_strings(units["neuron_id"].data[:])
    else:
        ids = as_id_strings(units.id.data[:])
    spikes = []
    for u, st in enumerate(_ragged(path, units["spike_times"], "spike_times")):
        st = np.asarray(st, dtype=np.float64)
        if not np.all(np.isfinite(st)):
            raise InputError(path, f"unit {ids[u]} has non-finite spike times")
        spikes.append(np.sort(st))
    intervals = None
    if "obs_intervals" in units.colnames:
        intervals = [
            np.asarray(iv, dtype=np.float64).reshape(-1, 2)
            for iv in _ragged(path, units["obs_intervals"], "obs_intervals")
        ]
    n_units = len(spikes)
    rate = 1.0 / bin_size_s
    attrs: dict[str, Any] = {"series": UNITS, "bin_size_s": bin_size_s}
    if trials is None:
        times = [st[[0, -1]] for st in spikes if st.size]
        if intervals is not None:
            times += [iv.ravel() for iv in intervals if iv.size]
        if not times:
            raise InputError(path, "empty recording: no spikes and no observation intervals")
        allt = np.concatenate(times)
        t0 = 0.0 if allt.min() >= 0 else math.floor(allt.min() / bin_size_s) * bin_size_s
        n_bins = int(math.floor((allt.max() - t0) / bin_size_s)) + 1
        rows = time_chunk_rows(n_units, 4, chunk_mb)

        def block(b0: int, b1: int) -> np.ndarray:
            edges = t0 + bin_size_s * np.arange(b0, b1 + 1, dtype=np.float64)
            return mask_unobserved(count_spikes(spikes, edges), intervals, edges)

        parts = [
            da.from_delayed(
                dask.delayed(block)(b0, min(b0 + rows, n_bins)),
                shape=(min(b0 + rows, n_bins) - b0, n_units),
                dtype=np.float32,
            )
            for b0 in range(0, n_bins, rows)
        ]
        x = da.concatenate(parts, axis=0)
        attrs["t_start_s"] = t0
        trial_ids = None
    else:
        starts, stops, trial_ids = _trial_table(path, nwb)
        win = trial_windows(path, starts, stops, trials)
        n_bins = int(math.floor(win.duration / bin_size_s + 1e-6))
        if n_bins < 1:
            raise InputError(path, f"trial window of {win.duration} s is shorter than one bin")
        per_chunk = max(1, time_chunk_rows(n_units * n_bins, 4, chunk_mb))
        eps = 1e-6 * bin_size_s

        def trial_block(r0: int, r1: int) -> np.ndarray:
            out = np.empty((r1 - r0, n_bins, n_units), dtype=np.float32)
            for i, r in enumerate(range(r0, r1)):
                edges = win.start[r] + bin_size_s * np.arange(n_bins + 1, dtype=np.float64)
                out[i] = mask_unobserved(count_spikes(spikes, edges), intervals, edges)
                # bins not wholly inside the trial are missing, never taken from between trials
                outside = (edges[:-1] < win.lo[r] - eps) | (edges[1:] > win.hi[r] + eps)
                out[i, outside] = np.nan
            return out

        n_trials = len(win.start)
        parts = [
            da.from_delayed(
                dask.delayed(trial_block)(r0, min(r0 + per_chunk, n_trials)),
                shape=(min(r0 + per_chunk, n_trials) - r0, n_bins, n_units),
                dtype=np.float32,
            )
            for r0 in range(0, n_trials, per_chunk)
        ]
        x = da.concatenate(parts, axis=0)
        in_trials = sum(
            int(np.sum(np.searchsorted(st, win.hi) - np.searchsorted(st, win.lo))) for st in spikes
        )
        lo = np.maximum(win.start, win.lo)
        hi = np.minimum(win.start + n_bins * bin_size_s, win.hi)
        kept = sum(
            int(np.sum(np.clip(np.searchsorted(st, hi) - np.searchsorted(st, lo), 0, None)))
            for st in spikes
        )
        attrs.update(
            trial_window_start_s=win.start.tolist(),
            trial_duration_s=n_bins * bin_size_s,
            trial_crop=bool(trials.crop),
            trial_time_kept_fraction=win.kept,
            trial_spikes=in_trials,
            trial_spikes_kept_fraction=kept / in_trials if in_trials else 1.0,
        )
    return Recording(
        name=spec.display_name,
        activity=x,
        neuron_ids=ids,
        rate_hz=rate,
        kind="counts",
        source=path,
        trial_ids=trial_ids,
        trial_columns=trial_columns(nwb) if trial_ids is not None else None,
        attrs=attrs,
    )
