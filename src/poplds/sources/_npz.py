"""NumPy ``.npz`` reader.

Keys: ``activity`` (time, neurons) or (trials, time, neurons); ``neuron_ids`` (neurons,);
``rate_hz`` (scalar); optional ``trial_ids`` (trials,) and ``kind`` (``"traces"`` or
``"counts"``). Integer or boolean activity is taken as spike counts unless ``kind`` says
otherwise.
"""

from __future__ import annotations

import zipfile

import dask.array as da
import numpy as np

from .._errors import InputError
from ._base import (
    Recording,
    RecordingSpec,
    as_float32,
    as_id_strings,
    check_activity_header,
    time_chunk_rows,
)

REQUIRED = ("activity", "neuron_ids", "rate_hz")


def read_npz(spec: RecordingSpec, *, chunk_mb: float = 4.0) -> Recording:
    """Read one ``.npz`` file as a :class:`Recording` (the arrays are loaded; npz cannot be
    memory-mapped; use NWB or suite2p ``.npy`` for recordings larger than memory)."""
    path = spec.path
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in REQUIRED if k not in z.files]
            if missing:
                raise InputError(
                    path, f"missing array(s) {missing}; an npz recording needs {list(REQUIRED)}"
                )
            activity = z["activity"]
            ids = z["neuron_ids"]
            rate = z["rate_hz"]
            trial_ids = z["trial_ids"] if "trial_ids" in z.files else None
            kind_in_file = str(z["kind"]) if "kind" in z.files else None
    except InputError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InputError(path, f"not a readable .npz file (corrupt or truncated?): {exc}") from exc
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise InputError(path, f"cannot read arrays (object or non-numeric data?): {exc}") from exc
    check_activity_header(path, activity.shape, activity.dtype)
    if np.asarray(rate).size != 1:
        raise InputError(path, f"rate_hz must be a scalar, got shape {np.shape(rate)}")
    try:
        rate_hz = float(np.asarray(rate).reshape(()))
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"rate_hz is not a number: {rate!r}") from exc
    if ids.ndim != 1:
        raise InputError(path, f"neuron_ids must be 1-D, got shape {ids.shape}")
    kind = spec.kind or kind_in_file
    if kind is None:
        kind = "counts" if activity.dtype.kind in "iub" else "traces"
    if kind not in ("traces", "counts"):
        raise InputError(path, f"kind must be 'traces' or 'counts', got {kind!r}")
    if trial_ids is not None:
        if activity.ndim != 3:
            raise InputError(path, "trial_ids given but activity has no trial axis (2-D)")
        if not np.issubdtype(trial_ids.dtype, np.integer):
            raise InputError(path, f"trial_ids must be integers, not {trial_ids.dtype}")
    elif activity.ndim == 3:
        trial_ids = np.arange(activity.shape[0])
    row = int(np.prod(activity.shape[1:]))
    chunks = (time_chunk_rows(row, 4, chunk_mb),) + tuple(activity.shape[1:])
    x = as_float32(da.from_array(activity, chunks=chunks), path)
    return Recording(
        name=spec.display_name,
        activity=x,
        neuron_ids=as_id_strings(ids),
        rate_hz=rate_hz,
        kind=kind,
        source=path,
        trial_ids=None if trial_ids is None else trial_ids.astype(np.int64),
        attrs={"input_dtype": str(activity.dtype)},
    )
