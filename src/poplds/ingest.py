"""Ingest: several partial recordings of one circuit into one dataset store.

Two steps, so that a cluster ingests a dataset's recordings in parallel:

1. :func:`ingest_recording` opens one recording lazily, checks it, and streams its activity
   through dask into a part store of its own (its own neuron ids, independent of the other
   recordings; one workflow job per recording).
2. :func:`assemble_dataset` checks the parts against each other (same sampling rate, same kind
   of data, same trial structure, no data listed twice), builds the global neuron table (ids in
   order of first appearance across recordings) and the coverage tables, and links the parts'
   chunks into ``data.zarr`` (hard links: no second copy of the data).

:func:`ingest_dataset` runs both from Python. Every store and part is built at
``<path>.partial`` and renamed when complete, so a failed or interrupted run never leaves a
half-written output; rerunning :func:`ingest_dataset` after an interruption reuses the
recordings already written (same sources, by sha256).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr
from dask.callbacks import Callback

from ._errors import InputError, disk_space_named
from ._logging import get_logger
from ._version import __version__
from .sources import (
    RATE_RTOL,
    Recording,
    RecordingSpec,
    TrialOptions,
    check_name,
    file_sha256,
    open_recording,
)
from .store import (
    FORMAT,
    activity_chunks,
    choose_codec,
    coverage,
    create_activity,
    write_array,
    write_strings,
)

log = get_logger()

#: Format tag of a one-recording part store (:func:`ingest_recording`).
PART_FORMAT = "poplds-part-1"

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


def global_neuron_ids(
    neuron_ids: Sequence[np.ndarray],
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The dataset's neuron table and each recording's positions in it.

    ``neuron_ids`` holds each recording's own ids, (neurons_r,) str. Ids are taken in order of
    first appearance: recording by recording, neuron by neuron.
    Returns ``(neuron_ids (N_total,), [positions (neurons_r,) for each recording])``.
    """
    table: dict[str, int] = {}
    positions = []
    for ids in neuron_ids:
        pos = np.empty(len(ids), dtype=np.int64)
        for j, nid in enumerate(np.asarray(ids).tolist()):
            pos[j] = table.setdefault(nid, len(table))
        positions.append(pos)
    return np.array(list(table), dtype=str), positions


@dataclass(frozen=True)
class _Part:
    """What the assembly needs to know about one ingested recording (a part store)."""

    path: Path
    name: str
    reading: dict[str, Any]
    settings: dict[str, Any]
    recording: dict[str, Any]
    shape: tuple[int, ...]

    @property
    def source(self) -> Path:
        return Path(self.recording["source"])

    @property
    def sha(self) -> str:
        return str(self.recording["sha256"])

    @classmethod
    def read(cls, path: str | Path) -> _Part:
        """Open a part written by :func:`ingest_recording`; :class:`InputError` if it is not
        one or was never completed."""
        path = Path(path)
        try:
            root = zarr.open_group(str(path), mode="r")
            attrs = dict(root.attrs)
        except Exception as err:  # noqa: BLE001 - any unreadable part is reported as such
            raise InputError(path, f"not a readable recording part ({err})") from err
        if attrs.get("format") == FORMAT:
            raise InputError(path, "is a dataset store, not a recording part (ingest_recording)")
        if attrs.get("format") != PART_FORMAT or not attrs.get("recording", {}).get("complete"):
            raise InputError(path, "not a complete poplds recording part; ingest it again")
        try:
            shape = tuple(root["activity"].shape)
        except Exception as err:  # noqa: BLE001
            raise InputError(path, f"not a readable recording part ({err})") from err
        return cls(
            path, attrs["name"], attrs["reading"], attrs["settings"], attrs["recording"], shape
        )

    def neuron_ids(self) -> np.ndarray:
        """(neurons,) the recording's own neuron ids, in its column order."""
        root = zarr.open_group(str(self.path), mode="r")
        return np.array(root["neuron_ids"][:].tolist(), dtype=str)


def _check_names(specs: Sequence[RecordingSpec]) -> list[str]:
    """Each recording's name (usable, and distinct across the dataset)."""
    seen: dict[str, Path] = {}
    for spec in specs:
        name = check_name(spec)
        if name in seen:
            raise InputError(
                spec.path,
                f"recording name {name!r} is also used by {seen[name]}; "
                "give each recording a distinct 'name'",
            )
        seen[name] = spec.path
    return list(seen)


def _check_consistent(parts: Sequence[_Part]) -> None:
    """Same rate, kind, axis layout and ingest settings across one dataset's recordings."""
    first = parts[0]
    names: dict[str, Path] = {}
    for part in parts:
        rec, ref = part.recording, first.recording
        if part.name in names:
            raise InputError(
                part.source,
                f"recording name {part.name!r} is also used by {names[part.name]}; "
                "give each recording a distinct 'name'",
            )
        names[part.name] = part.source
        if part.settings != first.settings:
            raise InputError(
                part.path,
                f"was ingested with {part.settings} but {first.path} with {first.settings}; "
                "ingest every recording of a dataset with the same settings",
            )
        if not math.isclose(rec["rate_hz"], ref["rate_hz"], rel_tol=RATE_RTOL):
            raise InputError(
                part.source,
                f"sampling rate {rec['rate_hz']:g} Hz differs from {ref['rate_hz']:g} Hz of "
                f"{first.source}; all recordings of a dataset need the same rate",
            )
        if rec["kind"] != ref["kind"]:
            raise InputError(
                part.source,
                f"holds {rec['kind']} but {first.source} holds {ref['kind']}; "
                "one dataset cannot mix spike counts and traces",
            )
        if len(part.shape) != len(first.shape):
            raise InputError(
                part.source,
                f"has {len(part.shape)} axes but {first.source} has "
                f"{len(first.shape)}; one dataset cannot mix trial and continuous data",
            )
        if len(part.shape) == 3 and part.shape[1] != first.shape[1]:
            raise InputError(
                part.source,
                f"trials have {part.shape[1]} bins but those of "
                f"{first.source} have {first.shape[1]}",
            )


def _check_not_twice(parts: Sequence[_Part]) -> None:
    """The same data (same file content and the same reading of it) listed twice under two
    names would count every one of its pairs twice: refused."""
    seen: dict[tuple, _Part] = {}
    for part in parts:
        r = part.reading
        key = (part.sha, *(str(r.get(k)) for k in sorted(r)))
        if key in seen:
            first = seen[key]
            raise InputError(
                part.source,
                f"recording {part.name!r} is the same data as recording {first.name!r} "
                f"({first.source}, sha256 {part.sha[:12]}...); list each recording once",
            )
        seen[key] = part


def _write_recording(
    group: zarr.Group, rec: Recording, sha: str, chunk_mb: float, codec: str = "auto"
) -> None:
    """Stream one recording into the part store ``group`` and check its values in the same
    pass, compressed with ``codec`` (``auto``: chosen by :func:`.store.choose_codec` from the
    recording's kind and its first chunk); the recording's attributes go to
    ``group.attrs["recording"]``."""
    rows = activity_chunks(rec.activity.shape, chunk_mb)[0]
    chosen = choose_codec(codec, rec.kind, lambda: np.asarray(rec.activity[:rows]))
    arr = create_activity(group, rec.activity.shape, chunk_mb, chosen)
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
    write_strings(group, "neuron_ids", rec.neuron_ids)
    if rec.trial_ids is not None:
        write_array(group, "trial_ids", rec.trial_ids.astype(np.int64))
    if rec.trial_columns:
        table = group.require_group("trial_table")
        for column, values in rec.trial_columns.items():
            write_array(table, column, values)
    group.attrs["recording"] = {
        **{k: _jsonable(v) for k, v in rec.attrs.items()},
        "rate_hz": rec.rate_hz,
        "kind": rec.kind,
        "source": str(rec.source),
        "sha256": sha,
        "poplds_version": __version__,
        "n_missing": int(stats["n_missing"]),
        "codec": chosen,
        "empty_neurons": empty,
        "constant_neurons": constant,
        "complete": True,
    }
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


def _as_spec(recording: RecordingSpec | Mapping[str, Any], base: Path) -> RecordingSpec:
    if isinstance(recording, RecordingSpec):
        return recording
    return RecordingSpec.from_mapping(dict(recording), base)


def _settings(
    bin_size_s: float,
    trials: bool,
    trial_window: Sequence[float] | None,
    trial_crop: bool,
    chunk_mb: float,
    codec: str = "auto",
) -> dict[str, Any]:
    """The ingest settings a part was written with (all parts of a store share them)."""
    return {
        "chunk_mb": chunk_mb,
        "codec": codec,
        "bin_size_s": bin_size_s,
        "trials": trials,
        "trial_window": list(trial_window) if trial_window else None,
        "trial_crop": trial_crop,
    }


def _reading(spec: RecordingSpec) -> dict[str, Any]:
    """How the configuration asked for the source to be read (with its sha256, what makes two
    recordings the same data)."""
    return {
        "series": spec.series,
        "kind": spec.kind,
        "neuropil_coefficient": spec.neuropil_coefficient,
        "neuron_ids": None if spec.neuron_ids is None else str(spec.neuron_ids),
        "frames": None if spec.frames is None else list(spec.frames),
        "neurons": None if spec.neurons is None else list(spec.neurons),
    }


def ingest_recording(
    recording: RecordingSpec | Mapping[str, Any],
    out: str | Path,
    *,
    bin_size_s: float = 0.02,
    trials: bool = False,
    trial_window: Sequence[float] | None = None,
    trial_crop: bool = False,
    chunk_mb: float = 4.0,
    codec: str = "auto",
    base_dir: str | Path | None = None,
) -> Path:
    """Ingest one recording into its own part store ``out`` (one job per recording).

    The part is a Zarr v3 group laid out like ``data.zarr/recordings/<name>`` (``activity``,
    ``trial_ids``) plus the recording's own ``neuron_ids`` (str, (neurons,)); it does not depend
    on the other recordings, so a dataset's recordings can be ingested in parallel and adding
    one ingests only that one. :func:`assemble_dataset` then builds the dataset store from the
    parts. Written at ``<out>.partial`` and renamed when complete.

    Parameters are those of :func:`ingest_dataset` for one ``recordings:`` entry.

    Raises
    ------
    InputError: the recording is missing or malformed.
    """
    out = Path(out)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    spec = _as_spec(recording, base)
    name = check_name(spec)
    trial_opts = (
        TrialOptions(tuple(trial_window) if trial_window else None, crop=trial_crop)
        if trials
        else None
    )
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("opening %s", spec.path)
    rec = open_recording(spec, bin_size_s=bin_size_s, trials=trial_opts, chunk_mb=chunk_mb)
    size = 4.0 * float(np.prod(rec.activity.shape))  # float32 in the store
    try:
        with disk_space_named(out, f"recording {name} of {rec.source}", size):
            if trials and rec.activity.ndim != 3:
                raise InputError(rec.source, "trials: true but this recording has no trial axis")
            sha = file_sha256(rec.source)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            root.attrs.update(
                {
                    "format": PART_FORMAT,
                    "name": name,
                    "reading": _reading(spec),
                    "settings": _settings(
                        bin_size_s, trials, trial_window, trial_crop, chunk_mb, codec
                    ),
                }
            )
            _write_recording(root, rec, sha, chunk_mb, codec)
    except BaseException:  # the message may say nothing half-written is kept: it is not
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        rec.close()
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of the folder ``src`` into ``dst`` (a copy where the two lie on
    different file systems): the store shares the parts' chunks instead of a second copy."""
    for folder, _, files in os.walk(src):
        target = dst / Path(folder).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            try:
                os.link(Path(folder) / f, target / f)
            except OSError:
                shutil.copy2(Path(folder) / f, target / f)


def assemble_dataset(
    parts: Sequence[str | Path], out: str | Path, *, dataset: str | None = None
) -> Path:
    """Build the dataset store ``out`` (``data.zarr``) from parts written by
    :func:`ingest_recording`, in configuration order.

    Checks the recordings against each other (same rate, kind, trial structure and ingest
    settings; the same data not listed twice), builds the global neuron table (ids in order of
    first appearance, recording by recording), each recording's positions in it and the
    coverage tables, and links the parts' chunks into the store. The layout is that of
    :mod:`poplds.store`. Written at ``<out>.partial`` and renamed when complete; a previous
    store is replaced only then.

    Raises
    ------
    InputError: a part is missing or incomplete, or the recordings disagree.
    """
    out = Path(out)
    if not parts:
        raise InputError(out, "no recordings to ingest")
    infos = [_Part.read(p) for p in parts]
    _check_consistent(infos)
    _check_not_twice(infos)
    neuron_ids, positions = global_neuron_ids([p.neuron_ids() for p in infos])
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    size = sum(4.0 * float(np.prod(p.shape)) for p in infos)  # when links fall back to copies
    try:
        with disk_space_named(out, f"the dataset store of {len(infos)} recordings", size):
            _write_dataset(tmp, infos, positions, neuron_ids, dataset or out.parent.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("wrote %s: %d recordings, %d neurons in all", out, len(infos), len(neuron_ids))
    return out


def _write_dataset(
    tmp: Path, infos: Sequence[_Part], positions: list, neuron_ids: np.ndarray, dataset: str
) -> None:
    """The dataset store's group at ``tmp`` from its parts (:func:`assemble_dataset`)."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    root.attrs["plan"] = {
        "recordings": [[p.name, p.sha] for p in infos],
        **infos[0].settings,
    }
    recs = root.create_group("recordings")
    for part, pos in zip(infos, positions, strict=True):
        group = recs.create_group(part.name)
        for array in ("activity", "trial_ids", "trial_table"):
            if (part.path / array).exists():
                _link_tree(part.path / array, tmp / "recordings" / part.name / array)
        write_array(group, "neurons", pos)
        group.attrs.update(part.recording)
    write_strings(root, "neuron_ids", neuron_ids)
    shared, per_neuron = coverage(positions, len(neuron_ids))
    cov = root.create_group("coverage")
    write_strings(cov, "recording_names", np.array([p.name for p in infos]))
    write_array(cov, "shared_neurons", shared)
    write_array(cov, "recordings_per_neuron", per_neuron)
    first = infos[0]
    root.attrs.update(
        {
            "format": FORMAT,
            "poplds_version": __version__,
            "dataset": dataset,
            "recordings": [p.name for p in infos],
            "rate_hz": first.recording["rate_hz"],
            "kind": first.recording["kind"],
            "trials": len(first.shape) == 3,
        }
    )


def _reusable(part: Path, spec: RecordingSpec, settings: dict[str, Any]) -> bool:
    """Whether a part left by an interrupted :func:`ingest_dataset` holds this recording as
    the configuration now reads it (same settings, same reading, same source content)."""
    try:
        info = _Part.read(part)
    except InputError:
        return False
    return (
        info.settings == settings
        and info.reading == _reading(spec)
        and info.recording.get("source") == str(spec.path)
        and info.sha == file_sha256(spec.path)
    )


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
    codec: str = "auto",
    base_dir: str | Path | None = None,
) -> Path:
    """Ingest partial recordings of one circuit into the store ``out`` (``data.zarr``).

    Each recording is ingested by :func:`ingest_recording` into its own part under
    ``<out>.parts/``, then :func:`assemble_dataset` builds the store; the workflow runs the same
    two steps as one job per recording and one assembly job. Rerun after an interruption, the
    recordings already written are reused (same settings and same source content, by sha256);
    the parts are removed once the store is complete.

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
    codec: the activity's codec: ``auto`` (by kind and measurement:
        :func:`.store.choose_codec`), ``none``, or ``<zstd|lz4>:<level 1-9>:<byte|bit>``.
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
    specs = [_as_spec(r, base) for r in recordings]
    if not specs:
        raise InputError(out, "no recordings to ingest")
    names = _check_names(specs)
    settings = _settings(bin_size_s, trials, trial_window, trial_crop, chunk_mb, codec)
    parts_dir = out.with_name(out.name + ".parts")
    parts = [parts_dir / f"{name}.zarr" for name in names]
    try:
        for spec, part in zip(specs, parts, strict=True):
            if part.exists() and _reusable(part, spec, settings):
                log.info("%s: already written (resuming)", part.stem)
                continue
            ingest_recording(
                spec,
                part,
                bin_size_s=bin_size_s,
                trials=trials,
                trial_window=trial_window,
                trial_crop=trial_crop,
                chunk_mb=chunk_mb,
                codec=codec,
            )
        assemble_dataset(parts, out, dataset=dataset)
    except InputError:
        shutil.rmtree(parts_dir, ignore_errors=True)
        raise
    shutil.rmtree(parts_dir, ignore_errors=True)
    return out
