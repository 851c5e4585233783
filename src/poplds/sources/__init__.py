"""Source readers: one per format, all returning a :class:`Recording`.

To add a format, write ``_<format>.py`` with a ``read_<format>(spec, ...) -> Recording`` and
route to it in :func:`open_recording`.
"""

from __future__ import annotations

from pathlib import Path

from .._errors import InputError
from ._base import (
    RATE_RTOL,
    Recording,
    RecordingSpec,
    TrialOptions,
    check_name,
    check_unique_ids,
    file_sha256,
    load_id_file,
)
from ._npz import read_npz
from ._nwb import read_nwb
from ._suite2p import is_suite2p_folder, read_suite2p

__all__ = [
    "RATE_RTOL",
    "Recording",
    "RecordingSpec",
    "TrialOptions",
    "file_sha256",
    "open_recording",
    "read_npz",
    "read_nwb",
    "read_suite2p",
]


def open_recording(
    spec: RecordingSpec,
    *,
    bin_size_s: float = 0.02,
    trials: TrialOptions | None = None,
    chunk_mb: float = 4.0,
) -> Recording:
    """Open one recording lazily, choosing the reader by the path (``.nwb``, ``.npz``, suite2p
    folder), apply a ``neuron_ids`` override, and validate it.

    Raises
    ------
    InputError: the path is missing, of unknown format, or its content is malformed.
    """
    path: Path = spec.path
    if not path.exists():
        raise InputError(path, "file not found")
    if is_suite2p_folder(path):
        if trials is not None:
            raise InputError(path, "trials: true needs an NWB trials table; suite2p has none")
        rec = read_suite2p(spec, chunk_mb=chunk_mb)
    elif path.is_dir():
        raise InputError(path, "unknown format: a folder without suite2p's F.npy")
    elif path.suffix.lower() == ".nwb":
        rec = read_nwb(spec, bin_size_s=bin_size_s, trials=trials, chunk_mb=chunk_mb)
    elif path.suffix.lower() == ".npz":
        rec = read_npz(spec, chunk_mb=chunk_mb)
    else:
        raise InputError(
            path,
            f"unknown format {path.suffix or '(no suffix)'!r}; expected .nwb, .npz or a "
            "suite2p plane folder",
        )
    try:
        check_name(spec)
        if spec.neuron_ids is not None:
            ids = load_id_file(spec.neuron_ids)
            n = rec.activity.shape[-1]
            if ids.shape[0] != n:
                raise InputError(
                    spec.neuron_ids,
                    f"{ids.shape[0]} neuron ids for the {n} neurons of {path}; the file needs "
                    "one id per neuron, in the data's column order",
                )
            check_unique_ids(spec.neuron_ids, ids)
            rec.neuron_ids = ids
        select(rec, spec)
        rec.validate()
    except BaseException:
        rec.close()
        raise
    return rec


def _range(spec: RecordingSpec, key: str, size: int, what: str) -> slice:
    """``spec.<key>`` as a slice of ``size`` items, or InputError naming the file and key."""
    first, stop = (int(v) for v in getattr(spec, key))
    if not 0 <= first < stop <= size:
        raise InputError(
            spec.path,
            f"{key}: [{first}, {stop}] is not a range of its {size} {what} "
            f"(0 <= first < stop <= {size})",
        )
    return slice(first, stop)


def select(rec: Recording, spec: RecordingSpec) -> None:
    """Keep the ``frames`` and ``neurons`` ranges of ``spec`` (in place; lazy), and record
    them in ``rec.attrs["selection"]``."""
    if spec.frames is None and spec.neurons is None:
        return
    selection = {}
    if spec.frames is not None:
        if rec.activity.ndim != 2:
            raise InputError(
                spec.path,
                "frames: selects time steps of a continuous recording; with trials: true, "
                "choose trials with trial_window instead",
            )
        sl = _range(spec, "frames", int(rec.activity.shape[0]), "time steps")
        rec.activity = rec.activity[sl]
        selection["frames"] = [sl.start, sl.stop]
    if spec.neurons is not None:
        sl = _range(spec, "neurons", int(rec.activity.shape[-1]), "neurons")
        rec.activity = rec.activity[..., sl]
        rec.neuron_ids = rec.neuron_ids[sl]
        selection["neurons"] = [sl.start, sl.stop]
    rec.attrs["selection"] = selection


def source_sha256(path: Path) -> str:
    """sha256 of a source file, or of a suite2p folder's files."""
    return file_sha256(path)
