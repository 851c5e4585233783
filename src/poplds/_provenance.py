"""What ran where: software versions, the git commit of a source checkout, the device.

Every fit writes :func:`provenance` into its ``metrics.json`` so that a report (or a reader of
the JSON years later) can say which code on which machine produced each number.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ._version import __version__

#: Packages whose versions are recorded.
PACKAGES = ("torch", "numpy", "scipy", "zarr", "dask", "pynwb", "snakemake")


def git_commit(path: Path | None = None) -> str | None:
    """The commit (with ``-dirty`` when the tree has changes) of the checkout holding this
    package, or None when it is not in a git checkout (an installed wheel)."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def device_description(device: Any) -> str:
    """A readable name of a torch device: the GPU's name, or the CPU's model and cores."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def provenance(device: Any | None = None) -> dict[str, Any]:
    """``{"poplds", "git_commit", "python", <package>: version, "platform", "host", "date",
    "device"}`` for the running process (``device``: the torch device a fit ran on)."""
    out: dict[str, Any] = {
        "poplds": __version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
    }
    out.update({name: _package_version(name) for name in PACKAGES})
    out["platform"] = platform.platform()
    out["host"] = platform.node()
    out["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    if device is not None:
        out["device"] = device_description(device)
    return out
