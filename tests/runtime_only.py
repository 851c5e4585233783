"""A view of this environment that holds only poplds's runtime dependencies, as after
``pip install -e .`` (or ``envs/poplds.yaml``), so that a test run in the dev environment still
notices a runtime need that only a dev extra (pytest brings pygments, for one) fills."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

#: In every virtual environment whatever was installed into it.
ALWAYS_THERE = {"pip", "setuptools", "wheel"}


def runtime_closure(root: str = "poplds") -> set[str]:
    """Canonical names of ``root`` and of every distribution that its requirements (without
    extras of its own; with the extras they name) pull in, as installed here."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    names: set[str] = set()
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional need that is not installed
        names.add(key[0])
        envs = [{"extra": e} for e in extras] or [{"extra": ""}]
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return names


def runtime_only_python(folder: Path, src: Path) -> tuple[list[str], dict[str, str]]:
    """The command prefix and environment of a Python that sees the standard library, the
    package sources ``src`` and, through links in ``folder``, the installed files of the
    runtime closure alone (``-S``: no site-packages, no ``.pth`` files)."""
    import sys

    keep = runtime_closure() | ALWAYS_THERE
    folder.mkdir(parents=True, exist_ok=True)
    for dist in metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in keep:
            continue
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            link, target = folder / top, Path(dist.locate_file(top))
            if target.exists() and not link.exists() and not top.endswith(".pth"):
                link.symlink_to(target)
    path = os.pathsep.join([str(folder), str(src)])
    return [sys.executable, "-S"], {**os.environ, "PYTHONPATH": path}
