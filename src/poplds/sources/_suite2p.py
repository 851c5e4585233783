"""suite2p plane-folder reader.

A plane folder holds ``F.npy`` and ``Fneu.npy`` (rois, time), ``iscell.npy`` (rois, 2) and
``ops.npy`` (a pickled dict with the frame rate ``fs`` and the neuropil coefficient
``neucoeff``). The recording is the neuropil-corrected fluorescence of the ROIs classified as
cells, time-major::

    activity[t, j] = F[cell_j, t] - neucoeff * Fneu[cell_j, t]      (computed in float64)

Neuron ids are the suite2p ROI indices unless a ``neuron_ids`` file gives cross-session matches.
``F.npy`` and ``Fneu.npy`` are read chunk by chunk from memory maps (:class:`NpyArray`), so
planes larger than memory stream through.
"""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np

from .._errors import InputError
from ._base import NpyArray, Recording, RecordingSpec, as_float32, time_chunk_rows

FILES = ("F.npy", "Fneu.npy", "iscell.npy", "ops.npy")


def is_suite2p_folder(path: Path) -> bool:
    """True for a folder that looks like a suite2p plane (has ``F.npy``)."""
    return path.is_dir() and (path / "F.npy").exists()


def _load(path: Path, name: str, **kw) -> np.ndarray:
    try:
        return np.load(path / name, **kw)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(path / name, f"cannot be read as a .npy file: {exc}") from exc


def read_suite2p(spec: RecordingSpec, *, chunk_mb: float = 4.0) -> Recording:
    """Read a suite2p plane folder as a :class:`Recording` of cells' corrected traces."""
    path = spec.path
    missing = [f for f in FILES if not (path / f).exists()]
    if missing:
        raise InputError(path, f"suite2p plane folder lacks {missing}")
    F = _load(path, "F.npy", mmap_mode="r")
    Fneu = _load(path, "Fneu.npy", mmap_mode="r")
    iscell = _load(path, "iscell.npy")
    ops = _load(path, "ops.npy", allow_pickle=True)
    ops = ops.item() if ops.dtype == object and ops.shape == () else ops
    if not isinstance(ops, dict):
        raise InputError(path / "ops.npy", "expected a pickled dict of suite2p options")
    if "fs" not in ops:
        raise InputError(path / "ops.npy", "has no frame rate 'fs'")
    for name, arr in (("F.npy", F), ("Fneu.npy", Fneu)):
        if arr.ndim != 2:
            raise InputError(path / name, f"must be (rois, time), got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.number):
            raise InputError(path / name, f"is not numeric (dtype {arr.dtype})")
    if Fneu.shape != F.shape:
        raise InputError(path / "Fneu.npy", f"shape {Fneu.shape} differs from F.npy {F.shape}")
    if iscell.ndim not in (1, 2) or iscell.shape[0] != F.shape[0]:
        raise InputError(
            path / "iscell.npy", f"shape {iscell.shape} does not match {F.shape[0]} rois in F.npy"
        )
    cells = np.flatnonzero((iscell[:, 0] if iscell.ndim == 2 else iscell) > 0.5)
    if cells.size == 0 or F.shape[1] == 0:
        raise InputError(path, f"empty recording: {cells.size} cells, {F.shape[1]} frames")
    coeff = spec.neuropil_coefficient
    if coeff is None:
        coeff = float(ops.get("neucoeff", 0.7))
    rows = time_chunk_rows(len(cells), 8, chunk_mb)
    f = da.from_array(NpyArray(path / "F.npy"), chunks=(-1, rows))[cells].T.astype(np.float64)
    fn = da.from_array(NpyArray(path / "Fneu.npy"), chunks=(-1, rows))[cells]
    fn = fn.T.astype(np.float64)
    x = as_float32(f - coeff * fn, path)
    return Recording(
        name=spec.display_name,
        activity=x,
        neuron_ids=cells.astype(str),
        rate_hz=float(ops["fs"]),
        kind="traces",
        source=path,
        attrs={"neuropil_coefficient": coeff, "suite2p_roi_index": cells.tolist()},
    )
