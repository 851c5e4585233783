"""The one interface every source reader implements.

A reader turns one recording file (or folder) into a :class:`Recording`: a lazy, time-major
dask array of activity plus the identity of its neurons. Readers check everything that can be
checked without reading the data (rank, shapes, ids, sampling rate); value checks (negative or
fractional spike counts, non-finite values) happen while the store is written, in the same pass.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np

from .._errors import InputError

Kind = Literal["traces", "counts"]

#: Relative tolerance under which two sampling rates count as equal.
RATE_RTOL = 1e-6


@dataclass(frozen=True)
class RecordingSpec:
    """What the configuration says about one recording.

    Attributes
    ----------
    path: the ``.nwb`` or ``.npz`` file, or a suite2p plane folder.
    name: the recording's name in the store; defaults to the file stem (folder name for suite2p).
    series: NWB only: the name of the ``RoiResponseSeries`` to read, or ``"units"`` for the
        units table; by default the one kind present.
    neuron_ids: optional ``.npy`` or ``.txt`` file with one id per neuron, overriding the
        source's own ids (e.g. cross-session ROI matches for suite2p).
    kind: ``"traces"`` or ``"counts"``, to override what the source implies (npz only).
    neuropil_coefficient: suite2p only: ``F - coefficient * Fneu``; default ``ops['neucoeff']``.
    frames: ``(start, stop)``: keep time steps (samples, or bins of spike times) ``[start,
        stop)`` of a continuous recording; with ``neurons``, one file gives several partial
        recordings (e.g. to validate stitching on a single session).
    neurons: ``(first, stop)``: keep the neurons (columns, in the source's order)
        ``[first, stop)``.
    """

    path: Path
    name: str | None = None
    series: str | None = None
    neuron_ids: Path | None = None
    kind: Kind | None = None
    neuropil_coefficient: float | None = None
    frames: tuple[int, int] | None = None
    neurons: tuple[int, int] | None = None

    @property
    def display_name(self) -> str:
        """The name the recording gets in the store (checked by :func:`check_name`)."""
        if self.name:
            return self.name
        return self.path.name if self.path.is_dir() else self.path.stem

    @classmethod
    def from_mapping(cls, entry: dict[str, Any], base_dir: Path | None = None) -> RecordingSpec:
        """Build a spec from one ``recordings:`` entry of the config; relative paths are taken
        against ``base_dir`` (the workflow's working directory)."""

        def resolve(p: Any) -> Path | None:
            if p is None:
                return None
            path = Path(p).expanduser()
            return path if path.is_absolute() or base_dir is None else base_dir / path

        if "path" not in entry:
            raise InputError("recordings", f"entry {entry!r} has no 'path'")
        resolved = resolve(entry["path"])
        assert resolved is not None
        return cls(
            path=resolved,
            name=entry.get("name"),
            series=entry.get("series"),
            neuron_ids=resolve(entry.get("neuron_ids")),
            kind=entry.get("kind"),
            neuropil_coefficient=entry.get("neuropil_coefficient"),
            frames=tuple(entry["frames"]) if entry.get("frames") is not None else None,
            neurons=tuple(entry["neurons"]) if entry.get("neurons") is not None else None,
        )


#: Recording names: what the config schema allows for ``name:`` (also checked for the defaults
#: taken from file names).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_name(spec: RecordingSpec) -> str:
    """The recording's name, or :class:`InputError` naming the file when it is not usable as a
    store group name (``NAME_PATTERN``: letters, digits, ``_ . -``, not starting with a dot)."""
    name = spec.display_name
    if NAME_PATTERN.match(name):  # "." and ".." fail it: a name starts with a letter or digit
        return name
    origin = "its name:" if spec.name else "the file name gives the recording name"
    raise InputError(
        spec.path,
        f"{origin} {name!r}, which is not a usable recording name (letters, digits, _ . - "
        "only, not starting with a dot); set name: in its recordings entry",
    )


@dataclass(frozen=True)
class TrialOptions:
    """How trials are cut out of a continuous recording.

    Attributes
    ----------
    window: ``(start, stop)`` in seconds relative to each trial's ``start_time``; every trial
        gets the same window, and its bins outside the trial's own ``[start_time, stop_time)``
        are missing (NaN): they are never taken from between trials. ``None`` keeps every
        trial whole, padded with missing values to the longest trial.
    crop: without a window, crop every trial to the shortest trial's duration instead (an
        explicit choice: the data dropped is logged and recorded).
    """

    window: tuple[float, float] | None = None
    crop: bool = False


@dataclass
class Recording:
    """One session's activity, lazily read.

    Attributes
    ----------
    name: the recording's name in the store.
    activity: float32 dask array, ``(time, neurons)`` or ``(trials, time, neurons)``; NaN marks
        missing values.
    neuron_ids: ``(neurons,)`` unicode ids; the same id in two recordings is the same neuron.
    rate_hz: samples (bins) per second.
    kind: ``"traces"`` (fluorescence, events) or ``"counts"`` (spike counts).
    source: the file or folder read.
    trial_ids: ``(trials,)`` int64 trial numbers for trial data, else ``None``.
    trial_columns: the trials table's numeric columns, ``{name: (trials,) float64}`` (NWB).
    attrs: further provenance written to the store (series name, bin edges, trial window...).
    closers: callables that release open files once the data has been written.
    """

    name: str
    activity: da.Array
    neuron_ids: np.ndarray
    rate_hz: float
    kind: Kind
    source: Path
    trial_ids: np.ndarray | None = None
    trial_columns: dict[str, np.ndarray] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        """Release the files the lazy activity reads from."""
        for close in self.closers:
            close()
        self.closers.clear()

    def validate(self) -> None:
        """Check shape, ids and rate; raise :class:`InputError` naming the source."""
        check_activity_header(self.source, self.activity.shape, self.activity.dtype)
        ids = self.neuron_ids
        if ids.ndim != 1 or ids.shape[0] != self.activity.shape[-1]:
            raise InputError(
                self.source,
                f"{ids.shape[0] if ids.ndim == 1 else ids.shape} neuron ids for "
                f"{self.activity.shape[-1]} neurons in the data (last axis of shape "
                f"{tuple(self.activity.shape)}); ids do not match the data",
            )
        check_unique_ids(self.source, ids)
        if not np.isfinite(self.rate_hz) or self.rate_hz <= 0:
            raise InputError(self.source, f"sampling rate must be positive, got {self.rate_hz!r}")
        if self.trial_ids is not None:
            if self.activity.ndim != 3:
                raise InputError(self.source, "trial ids given for data without a trial axis")
            if self.trial_ids.shape != (self.activity.shape[0],):
                raise InputError(
                    self.source,
                    f"{self.trial_ids.shape[0]} trial ids for {self.activity.shape[0]} trials",
                )
            check_unique_ids(self.source, self.trial_ids, what="trial ids")


def check_activity_header(source: Path, shape: Sequence[int], dtype: np.dtype) -> None:
    """Rank, emptiness and dtype checks that need no data read."""
    if len(shape) not in (2, 3):
        raise InputError(
            source,
            f"activity must have 2 axes (time, neurons) or 3 (trials, time, neurons); "
            f"got {len(shape)} axes with shape {tuple(shape)}",
        )
    if any(s == 0 for s in shape):
        raise InputError(source, f"empty recording: activity has shape {tuple(shape)}")
    if shape[-2] < 2:
        raise InputError(
            source,
            f"{shape[-2]} time step{'s' if shape[-2] != 1 else ''} per "
            f"{'trial' if len(shape) == 3 else 'recording'} (shape {tuple(shape)}); at least "
            "2 are needed to see any dynamics",
        )
    if not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
        raise InputError(source, f"activity is not numeric (dtype {dtype})")
    if np.issubdtype(dtype, np.complexfloating):
        raise InputError(source, f"activity is complex (dtype {dtype}); expected real numbers")


#: Largest finite float32; larger values would become infinite in the store.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _checked_float32(block: np.ndarray, source: Path) -> np.ndarray:
    b = np.asarray(block)
    if b.dtype.kind == "f" and b.dtype.itemsize > 4:
        finite = np.abs(b[np.isfinite(b)])
        if finite.size and finite.max() > FLOAT32_MAX:
            raise InputError(
                source,
                f"values up to {finite.max():.3g} exceed float32's range ({FLOAT32_MAX:.3g}), "
                "in which the store holds activity; rescale the data",
            )
    return b.astype(np.float32)


def as_float32(x: da.Array, source: Path) -> da.Array:
    """``x`` as float32, raising :class:`InputError` naming ``source`` (when the values are
    read) for finite values that float32 cannot hold, instead of storing them as infinite."""
    return x.map_blocks(_checked_float32, source, dtype=np.float32)


def check_unique_ids(source: Path, ids: np.ndarray, what: str = "neuron ids") -> None:
    """Raise when an id occurs twice in one recording, naming a few of the duplicates."""
    values, counts = np.unique(ids, return_counts=True)
    if np.any(counts > 1):
        dup = [str(v) for v in values[counts > 1][:5]]
        raise InputError(source, f"duplicate {what} in one recording: {', '.join(dup)}")


def as_id_strings(values: Any) -> np.ndarray:
    """Ids of any type (ints, bytes, str) as a unicode numpy array."""
    arr = np.asarray(values)
    if arr.dtype.kind == "S" or arr.dtype == object:
        out = [v.decode() if isinstance(v, bytes) else str(v) for v in arr.tolist()]
        return np.array(out, dtype=str) if out else np.array([], dtype=str)
    return arr.astype(str)


def load_id_file(path: Path) -> np.ndarray:
    """Read an ids override: ``.npy`` (any 1-D array) or text with one id per line."""
    if not path.exists():
        raise InputError(path, "neuron id file not found")
    if path.suffix == ".npy":
        ids = np.load(path, allow_pickle=False)
    else:
        ids = np.array([ln.strip() for ln in path.read_text().splitlines() if ln.strip()])
    if ids.ndim != 1:
        raise InputError(path, f"neuron ids must be 1-D, got shape {ids.shape}")
    return as_id_strings(ids)


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    """sha256 of a file, or of a folder's regular files in name order (suite2p planes)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(block):
                h.update(chunk)
    return h.hexdigest()


class NpyArray:
    """A ``.npy`` file as a lazy array-like for :func:`dask.array.from_array`.

    Dask treats a ``numpy.memmap`` as an in-memory array and copies all of it into its chunks;
    this wrapper is not an ndarray, so dask calls ``__getitem__`` per chunk and only that slice
    of the file is read (and it pickles as a path, for distributed schedulers).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        mm = np.load(self.path, mmap_mode="r")
        self.shape: tuple[int, ...] = tuple(mm.shape)
        self.dtype: np.dtype = mm.dtype
        self.ndim: int = mm.ndim

    def __getitem__(self, index: Any) -> np.ndarray:
        return np.array(np.load(self.path, mmap_mode="r")[index])


def time_chunk_rows(n_columns: int, itemsize: int = 4, target_mb: float = 4.0) -> int:
    """Rows per chunk so that one chunk of ``n_columns`` values holds about ``target_mb`` MB."""
    return max(1, int(target_mb * 1e6 // max(1, n_columns * itemsize)))


@dataclass(frozen=True)
class TrialWindows:
    """Where each trial's bins lie: bin ``k`` of trial ``r`` is
    ``[start[r] + k * bin, start[r] + (k + 1) * bin)`` for ``k < duration / bin``; bins not
    wholly inside ``[lo[r], hi[r])`` are missing. ``kept`` is the fraction of the trials'
    total time that the windows keep."""

    start: np.ndarray
    duration: float
    lo: np.ndarray
    hi: np.ndarray
    kept: float


def trial_windows(
    source: Path,
    starts: np.ndarray,
    stops: np.ndarray,
    options: TrialOptions,
) -> TrialWindows:
    """The trials' windows (:class:`TrialWindows`).

    Whole trials (the default): ``[start_r, start_r + max_r(stop_r - start_r))``, the part
    past each trial's stop missing. ``crop``: every trial cut to the shortest,
    ``[start_r, start_r + min_r(stop_r - start_r))``. ``window=(a, b)``:
    ``[start_r + a, start_r + b)``, the part outside ``[start_r, stop_r)`` missing.
    """
    starts = np.asarray(starts, dtype=np.float64)
    stops = np.asarray(stops, dtype=np.float64)
    if starts.size == 0:
        raise InputError(source, "the trials table is empty")
    if np.any(~np.isfinite(starts)) or np.any(~np.isfinite(stops)):
        raise InputError(source, "the trials table has non-finite start or stop times")
    durations = stops - starts
    if np.any(durations <= 0):
        bad = int(np.argmax(durations <= 0))
        raise InputError(source, f"trial {bad} has stop_time <= start_time")
    if options.window is not None:
        a, b = (float(v) for v in options.window)
        if not b > a:
            raise InputError(source, f"trial window must have stop > start, got [{a}, {b}]")
        start, duration = starts + a, b - a
    elif options.crop:
        start, duration = starts.copy(), float(durations.min())
    else:
        start, duration = starts.copy(), float(durations.max())
    inside = np.clip(np.minimum(start + duration, stops) - np.maximum(start, starts), 0, None)
    return TrialWindows(start, duration, starts, stops, float(inside.sum() / durations.sum()))
