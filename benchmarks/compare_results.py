"""Compare two results trees of the workflow (e.g. before and after a refactoring): every JSON
value (timings, dates, versions and provenance aside), every Zarr array (values, dtype,
shape) and every NWB dataset (creation dates aside). Prints what differs and a count of what
is identical.

    python benchmarks/compare_results.py OLD/results NEW/results

A Poisson model's ``model.zarr/x_mean`` and ``x_var`` of releases before the shared latents
layout are compared with its ``latents.zarr`` (``poplds._outputs``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zarr

from poplds._results import json_leaves

#: Keys whose values measure the run or the machine, not the result.
RUN_KEYS = (
    "seconds",
    "time",
    "date",
    "provenance",
    "poplds_version",
    "host",
    "started",
    "finished",
)


def _same(a: Any, b: Any) -> bool:
    nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return a == b or nan


def compare_json(old: Path, new: Path) -> tuple[int, list[str]]:
    """Values compared and the differences, over every JSON file under ``old`` (zarr.json
    metadata included)."""
    count, diffs = 0, []
    for path in sorted(old.rglob("*.json")):
        rel = path.relative_to(old)
        if ".snakemake" in rel.parts:
            continue
        other = new / rel
        if not other.exists():
            diffs.append(f"{rel}: missing")
            continue
        a = dict(json_leaves(json.loads(path.read_text())))
        b = dict(json_leaves(json.loads(other.read_text())))
        for key in sorted(set(a) | set(b)):
            if any(k in key for k in RUN_KEYS):
                continue
            count += 1
            va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
            if not _same(va, vb):
                diffs.append(f"{rel}{key}: {va!r} -> {vb!r}")
    return count, diffs


def _counterpart(new: Path, rel: Path) -> Path:
    parts = rel.parts
    if parts[-1] in ("x_mean", "x_var") and parts[-2] == "model.zarr":
        latents = new.joinpath(*parts[:-2], "latents.zarr", "recordings")
        (name,) = zarr.open_group(str(latents), mode="r").group_keys()
        return latents / name / ("mean" if parts[-1] == "x_mean" else "var")
    return new / rel


def compare_arrays(old: Path, new: Path) -> tuple[int, list[str]]:
    """Zarr arrays compared and the differences (values with NaN equal, dtype, shape)."""
    count, diffs = 0, []
    for meta in sorted(old.rglob("zarr.json")):
        rel = meta.parent.relative_to(old)
        try:
            a = zarr.open_array(str(meta.parent), mode="r")
        except Exception:  # a group
            continue
        count += 1
        try:
            b = zarr.open_array(str(_counterpart(new, rel)), mode="r")
        except Exception as exc:
            diffs.append(f"{rel}: missing ({exc})")
            continue
        x, y = a[...], b[...]
        if x.shape != y.shape or x.dtype != y.dtype:
            diffs.append(f"{rel}: {x.dtype}{x.shape} -> {y.dtype}{y.shape}")
        elif not np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"):
            diffs.append(f"{rel}: values differ")
    return count, diffs


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def compare_nwb(old: Path, new: Path) -> tuple[int, list[str]]:
    """NWB files compared and the datasets that differ (creation dates aside)."""
    count, diffs = 0, []
    for path in sorted(old.rglob("*.nwb")):
        rel = path.relative_to(old)
        count += 1
        if not (new / rel).exists():
            diffs.append(f"{rel}: missing")
            continue
        with h5py.File(path, "r") as a, h5py.File(new / rel, "r") as b:
            for name in _datasets(a):
                if name.endswith("file_create_date"):
                    continue
                if name not in b:
                    diffs.append(f"{rel}:{name}: missing")
                    continue
                u, v = a[name][()], b[name][()]
                if isinstance(u, np.ndarray) and u.dtype.kind in "fc":
                    same = u.shape == v.shape and np.array_equal(u, v, equal_nan=True)
                else:
                    same = bool(np.all(u == v)) if np.shape(u) == np.shape(v) else False
                if not same:
                    diffs.append(f"{rel}:{name}: differs")
    return count, diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--show", type=int, default=40, help="differences printed at most")
    args = ap.parse_args()
    for what, compare in (("JSON values", compare_json), ("arrays", compare_arrays)):
        count, diffs = compare(args.old, args.new)
        print(f"{what}: {count} compared, {count - len(diffs)} identical, {len(diffs)} differ")
        for d in diffs[: args.show]:
            print("  ", d)
    count, diffs = compare_nwb(args.old, args.new)
    files = {d.split(":")[0] for d in diffs}
    print(f"NWB files: {count} compared, {count - len(files)} with identical datasets")
    for d in diffs[: args.show]:
        print("  ", d)


if __name__ == "__main__":
    main()
