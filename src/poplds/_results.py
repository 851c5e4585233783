"""Result files written atomically: a Zarr group or a JSON file appears complete or not at all."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr


def atomic_group(path: Path) -> tuple[zarr.Group, Path]:
    """A new Zarr v3 group at ``<path>.partial``; :func:`finish_group` renames it to path."""
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    return zarr.open_group(str(tmp), mode="w", zarr_format=3), tmp


def finish_group(tmp: Path, path: Path) -> None:
    """Replace ``path`` by the completed group at ``tmp``."""
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def json_clean(obj: Any) -> Any:
    """JSON-ready copy: numpy scalars to Python, non-finite floats to None, keys starting
    with ``_`` dropped."""
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list | tuple):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, value)`` of every leaf of a JSON tree, paths like ``/fit/free/passes`` and
    ``/covariance/heldout[3]/corr`` (to compare two metrics files value by value)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from json_leaves(v, f"{prefix}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from json_leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def write_json(path: Path, obj: Any) -> None:
    """Write :func:`json_clean` of obj under a temporary name, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_clean(obj), indent=2))
    tmp.replace(path)


@dataclass
class StoreFit:
    """What ``fit_store`` of either model family returns.

    metrics: the content of ``metrics.json``; outputs: the family's outputs dataclass (every
    path written); fits: the in-memory fits by model name (``stitched_lds``: a
    :class:`~poplds.stitched.StitchedFit`; ``plds``, ``nplds``, ``nplds_dynamics``: a
    :class:`~poplds.nplds.FitResult`); latents: the stitched LDS's per-recording posteriors
    (:class:`~poplds.stitched.inference.Posterior`), None for the trial models (whose q is in
    each fit's ``state``).
    """

    metrics: dict[str, Any]
    outputs: Any
    fits: dict[str, Any]
    latents: list | None = None

    @property
    def warnings(self) -> list[str]:
        """Every warning of the fits (also in ``metrics.json`` and the log)."""
        return list(self.metrics.get("warnings", []))


def unexpected_nonfinite(
    arrays: dict[str, Any], allowed_rows: np.ndarray | None = None
) -> dict[str, int]:
    """Per array about to be written, how many values are NaN or infinite, leaving out the
    rows in ``allowed_rows`` (neurons left out of the fit, whose rows are NaN by design) of
    arrays whose first axis is the neuron axis. A fit reports these counts in
    ``metrics.json`` (``nonfinite_written``) and warns when one is not zero."""
    out = {}
    for name, value in arrays.items():
        x = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        if not np.issubdtype(x.dtype, np.number):
            continue
        bad = ~np.isfinite(x)
        if allowed_rows is not None and x.ndim >= 1 and x.shape[0] == len(allowed_rows):
            bad[np.asarray(allowed_rows, dtype=bool)] = False
        out[name] = int(bad.sum())
    return out
