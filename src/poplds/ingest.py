"""Ingest: several partial recordings of one circuit into one dataset store.

``ingest_dataset`` opens every recording lazily, checks them against each other (same sampling
rate, same kind of data, same trial structure), builds the global neuron table (ids in order of
first appearance across recordings), and streams each recording's activity through dask into
``data.zarr``. The store is built at ``<out>.partial`` and renamed when complete, so a failed or
interrupted run never leaves a half-written store; rerunning after an interruption resumes at
the first recording not yet written (same sources, by sha256).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr
from dask.callbacks import Callback

from ._errors import InputError
from ._logging import get_logger
from ._version import __version__
from .sources import (
    RATE_RTOL,
    Recording,
    RecordingSpec,
    TrialOptions,
    file_sha256,
    open_recording,
)
from .store import FORMAT, coverage, create_activity, write_array, write_strings

log = get_logger()

#: Spike counts above this are not exactly representable in float32.
MAX_EXACT_COUNT = 2**24


class _Progress(Callback):
    """Log every ~10% of a dask computation's tasks."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        self.total = 0
        self.done = 0
        self.next_pct = 10

    def _start_state(self, dsk, state) -> None:  # noqa: ANN001 - dask's hook signature
        self.total = max(1, sum(len(state[k]) for k in ("ready", "waiting", "running")))

    def _posttask(self, key, result, dsk, state, worker_id) -> None:  # noqa: ANN001
        self.done += 1
        pct = 100 * self.done / self.total
        if pct >= self.next_pct and pct < 100:
            log.info("%s: %d%%", self.label, int(pct))
            self.next_pct = 10 * (int(pct) // 10 + 1)


def global_neuron_ids(recordings: Sequence[Recording]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The dataset's neuron table and each recording's positions in it.

    Ids are taken in order of first appearance: recording by recording, neuron by neuron.
    Returns ``(neuron_ids (N_total,), [positions (neurons_r,) for each recording])``.
    """
    table: dict[str, int] = {}
    positions = []
    for rec in recordings:
        pos = np.empty(len(rec.neuron_ids), dtype=np.int64)
        for j, nid in enumerate(rec.neuron_ids.tolist()):
            pos[j] = table.setdefault(nid, len(table))
        positions.append(pos)
    return np.array(list(table), dtype=str), positions


def _check_consistent(recordings: Sequence[Recording], trials: bool) -> None:
    """Same rate, kind and axis layout across one dataset's recordings."""
    first = recordings[0]
    names: dict[str, Path] = {}
    for rec in recordings:
        if rec.name in names:
            raise InputError(
                rec.source,
                f"recording name {rec.name!r} is also used by {names[rec.name]}; "
                "give each recording a distinct 'name'",
            )
        names[rec.name] = rec.source
        if trials and rec.activity.ndim != 3:
            raise InputError(rec.source, "trials: true but this recording has no trial axis")
        if not math.isclose(rec.rate_hz, first.rate_hz, rel_tol=RATE_RTOL):
            raise InputError(
                rec.source,
                f"sampling rate {rec.rate_hz:g} Hz differs from {first.rate_hz:g} Hz of "
                f"{first.source}; all recordings of a dataset need the same rate",
            )
        if rec.kind != first.kind:
            raise InputError(
                rec.source,
                f"holds {rec.kind} but {first.source} holds {first.kind}; "
                "one dataset cannot mix spike counts and traces",
            )
        if rec.activity.ndim != first.activity.ndim:
            raise InputError(
                rec.source,
                f"has {rec.activity.ndim} axes but {first.source} has "
                f"{first.activity.ndim}; one dataset cannot mix trial and continuous data",
            )
        if rec.activity.ndim == 3 and rec.activity.shape[1] != first.activity.shape[1]:
            raise InputError(
                rec.source,
                f"trials have {rec.activity.shape[1]} bins but those of "
                f"{first.source} have {first.activity.shape[1]}",
            )


def _check_not_twice(
    specs: Sequence[RecordingSpec], opened: Sequence[Recording], shas: Sequence[str]
) -> None:
    """The same data (same file content and the same reading of it) listed twice under two
    names would count every one of its pairs twice: refused."""
    seen: dict[tuple, Recording] = {}
    for spec, rec, sha in zip(specs, opened, shas, strict=True):
        key = (sha, spec.series, spec.kind, spec.neuropil_coefficient, spec.neuron_ids)
        if key in seen:
            first = seen[key]
            raise InputError(
                rec.source,
                f"recording {rec.name!r} is the same data as recording {first.name!r} "
                f"({first.source}, sha256 {sha[:12]}...); list each recording once",
            )
        seen[key] = rec


def _write_recording(
    group: zarr.Group, rec: Recording, positions: np.ndarray, sha: str, chunk_mb: float
) -> None:
    """Stream one recording into ``group`` and check its values in the same pass."""
    arr = create_activity(group, rec.activity.shape, chunk_mb)
    x = rec.activity.rechunk(arr.chunks)
    finite0 = dask.array.where(dask.array.isnan(x), 0, x)
    axes = tuple(range(x.ndim - 1))
    missing = dask.array.isnan(x)
    checks = {
        "n_missing": missing.sum(),
        "n_inf": dask.array.isinf(x).sum(),
        "observed": (~missing).sum(axis=axes),
        "lo": dask.array.where(missing, np.inf, x).min(axis=axes),
        "hi": dask.array.where(missing, -np.inf, x).max(axis=axes),
    }
    if rec.kind == "counts":
        checks["min"] = finite0.min()
        checks["max"] = finite0.max()
        checks["n_fractional"] = (finite0 != dask.array.round(finite0)).sum()
    nbytes = x.nbytes
    t = time.perf_counter()
    # progress lines only where a recording takes long enough to need them
    progress = _Progress(rec.name) if nbytes > 256e6 else contextlib.nullcontext()
    with progress:
        store_task = dask.array.store(x, arr, lock=False, compute=False)
        _, stats = dask.compute(store_task, checks)
    dt = time.perf_counter() - t
    if stats["n_inf"]:
        raise InputError(rec.source, f"{int(stats['n_inf'])} infinite values in the activity")
    if rec.kind == "counts":
        if stats["min"] < 0:
            raise InputError(rec.source, f"negative spike counts (minimum {stats['min']:g})")
        if stats["n_fractional"]:
            raise InputError(
                rec.source,
                f"{int(stats['n_fractional'])} spike counts are not whole numbers; "
                "set kind: traces for continuous data",
            )
        if stats["max"] >= MAX_EXACT_COUNT:
            raise InputError(rec.source, f"count {stats['max']:g} is too large for float32")
    empty = rec.neuron_ids[stats["observed"] == 0].tolist()
    constant = rec.neuron_ids[(stats["observed"] > 0) & (stats["lo"] == stats["hi"])].tolist()
    if empty:
        log.warning(
            "%s: %d neurons have no observed value (NaN throughout) and are left out of every "
            "fit: %s",
            rec.source,
            len(empty),
            empty[:20],
        )
    if constant:
        log.warning(
            "%s: %d neurons are constant over the whole recording (no variance) and are left "
            "out of the stitched LDS: %s",
            rec.source,
            len(constant),
            constant[:20],
        )
    write_array(group, "neurons", positions)
    if rec.trial_ids is not None:
        write_array(group, "trial_ids", rec.trial_ids.astype(np.int64))
    group.attrs.update(
        {
            **{k: _jsonable(v) for k, v in rec.attrs.items()},
            "rate_hz": rec.rate_hz,
            "kind": rec.kind,
            "source": str(rec.source),
            "sha256": sha,
            "poplds_version": __version__,
            "n_missing": int(stats["n_missing"]),
            "empty_neurons": empty,
            "constant_neurons": constant,
            "complete": True,
        }
    )
    log.info(
        "%s: %s float32 (%.1f MB) in %.2f s, %.1f MB/s; %d missing values",
        rec.name,
        "x".join(map(str, x.shape)),
        nbytes / 1e6,
        dt,
        nbytes / 1e6 / max(dt, 1e-9),
        int(stats["n_missing"]),
    )
    if x.ndim == 3:
        n_values = int(np.prod(x.shape))
        kept = rec.attrs.get("trial_time_kept_fraction", 1.0)
        spikes = rec.attrs.get("trial_spikes_kept_fraction")
        log.info(
            "%s: %d trials of up to %d bins; %.1f%% of the values missing (outside their trial "
            "or unobserved)",
            rec.name,
            x.shape[0],
            x.shape[1],
            100.0 * int(stats["n_missing"]) / max(n_values, 1),
        )
        if kept < 0.999 or (spikes is not None and spikes < 0.999):
            log.warning(
                "%s: the trial windows keep %.1f%% of the trials' time%s; the rest is dropped (%s)",
                rec.name,
                100 * kept,
                "" if spikes is None else f" and {100 * spikes:.1f}% of their spikes",
                "trial_crop: true"
                if rec.attrs.get("trial_crop")
                else "the trial_window is shorter than the trials",
            )


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def ingest_dataset(
    recordings: Sequence[RecordingSpec | Mapping[str, Any]],
    out: str | Path,
    *,
    dataset: str | None = None,
    bin_size_s: float = 0.02,
    trials: bool = False,
    trial_window: tuple[float, float] | None = None,
    trial_crop: bool = False,
    chunk_mb: float = 4.0,
    base_dir: str | Path | None = None,
) -> Path:
    """Ingest partial recordings of one circuit into the store ``out`` (``data.zarr``).

    Parameters
    ----------
    recordings: one entry per session: :class:`RecordingSpec` or a config mapping with ``path``
        and optionally ``name``, ``series``, ``neuron_ids``, ``kind``, ``neuropil_coefficient``.
    out: the store to write; replaced when it exists.
    dataset: the dataset's name, stored as an attribute (default: the parent folder's name).
    bin_size_s: bin width for NWB spike times.
    trials: cut trials out of each NWB file's trials table (or require 3-D npz data).
    trial_window: ``(start, stop)`` seconds relative to each trial's start; bins outside a
        trial's own ``[start_time, stop_time)`` are missing. Default: every trial whole,
        padded with missing values (NaN) to the longest.
    trial_crop: without a window, crop every trial to the shortest instead (the fraction of
        the trials' time and spikes that this drops is logged and stored).
    chunk_mb: target chunk size in MB.
    base_dir: folder relative recording paths are resolved against (default: current folder).

    Returns
    -------
    The path of the written store.

    Raises
    ------
    InputError: a recording is missing or malformed, or the recordings disagree.
    """
    out = Path(out)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    specs = [
        r if isinstance(r, RecordingSpec) else RecordingSpec.from_mapping(dict(r), base)
        for r in recordings
    ]
    if not specs:
        raise InputError(out, "no recordings to ingest")
    trial_opts = (
        TrialOptions(tuple(trial_window) if trial_window else None, crop=trial_crop)
        if trials
        else None
    )
    opened: list[Recording] = []
    tmp = out.with_name(out.name + ".partial")
    try:
        for spec in specs:
            log.info("opening %s", spec.path)
            opened.append(
                open_recording(spec, bin_size_s=bin_size_s, trials=trial_opts, chunk_mb=chunk_mb)
            )
        _check_consistent(opened, trials)
        shas = [file_sha256(rec.source) for rec in opened]
        _check_not_twice(specs, opened, shas)
        neuron_ids, positions = global_neuron_ids(opened)
        plan = {
            "recordings": [[rec.name, sha] for rec, sha in zip(opened, shas, strict=True)],
            "chunk_mb": chunk_mb,
            "bin_size_s": bin_size_s,
            "trials": trials,
            "trial_window": list(trial_window) if trial_window else None,
            "trial_crop": trial_crop,
        }
        root = _open_partial(tmp, plan)
        recs = root.require_group("recordings")
        for rec, pos, sha in zip(opened, positions, shas, strict=True):
            if rec.name in recs and recs[rec.name].attrs.get("complete"):
                log.info("%s: already written (resuming)", rec.name)
                continue
            if rec.name in recs:
                del recs[rec.name]
            _write_recording(recs.create_group(rec.name), rec, pos, sha, chunk_mb)
        for name in ("neuron_ids", "coverage"):
            if name in root:
                del root[name]
        write_strings(root, "neuron_ids", neuron_ids)
        shared, per_neuron = coverage(positions, len(neuron_ids))
        cov = root.create_group("coverage")
        write_strings(cov, "recording_names", np.array([r.name for r in opened]))
        write_array(cov, "shared_neurons", shared)
        write_array(cov, "recordings_per_neuron", per_neuron)
        root.attrs.update(
            {
                "format": FORMAT,
                "poplds_version": __version__,
                "dataset": dataset or out.parent.name,
                "recordings": [r.name for r in opened],
                "rate_hz": opened[0].rate_hz,
                "kind": opened[0].kind,
                "trials": opened[0].activity.ndim == 3,
            }
        )
    except InputError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for rec in opened:
            rec.close()
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("wrote %s: %d recordings, %d neurons in all", out, len(opened), len(neuron_ids))
    return out


def _open_partial(tmp: Path, plan: dict[str, Any]) -> zarr.Group:
    """The half-built store to continue, or a fresh one when its plan differs."""
    if tmp.exists():
        try:
            root = zarr.open_group(str(tmp), mode="r+")
            if root.attrs.get("plan") == plan:
                return root
        except Exception:  # unreadable leftovers are simply rebuilt
            pass
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    root.attrs["plan"] = plan
    return root
