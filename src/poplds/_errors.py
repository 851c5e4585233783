"""Errors a user can act on.

Every problem with a user's data, configuration or disk is a :class:`PopldsError` whose
message starts with the offending file (or configuration key) followed by what is wrong and
what to do, so that the line Snakemake prints in the terminal is enough to fix it: a workflow
job prints such an error's message alone, without a traceback (:func:`poplds._logging.setup_job`),
and keeps tracebacks for real bugs.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path


class PopldsError(Exception):
    """A problem the user can fix, told as ``<where>: <problem>``.

    Parameters
    ----------
    where:
        The file, folder or configuration key at fault.
    problem:
        What is wrong with it, in words a user can act on.
    """

    def __init__(self, where: str | PathLike[str], problem: str) -> None:
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")


class InputError(PopldsError, ValueError):
    """Bad input data or configuration (a damaged store included)."""


class NoSpaceError(PopldsError):
    """The disk filled up while a result was written (nothing half-written is kept)."""


def _free_bytes(path: Path) -> tuple[float, float]:
    """Free and total bytes of the filesystem that holds ``path`` (or its nearest parent)."""
    for folder in (path, *path.parents):
        if folder.exists():
            usage = shutil.disk_usage(folder)
            return float(usage.free), float(usage.total)
    return float("nan"), float("nan")


def _size(n: float) -> str:
    """Bytes in words: ``812 kB``, ``4.0 MB``, ``1.25 GB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n / 1e3:.3g} kB"


@contextmanager
def disk_space_named(path: str | PathLike[str], what: str, needed_bytes: float) -> Iterator[None]:
    """Turn "no space left on device" while writing ``what`` at ``path`` into a
    :class:`NoSpaceError` that says how much space the disk has and the write needs. The
    writer inside must have removed its partial output by then (it writes under a temporary
    name and removes it on failure), so the message can say nothing half-written is kept."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        free, total = _free_bytes(Path(path))
        raise NoSpaceError(
            path,
            f"no space left on the device while writing {what} ({_size(free)} free of "
            f"{_size(total)} on that disk; the data take up to {_size(needed_bytes)} "
            "uncompressed, usually 2-5 times less in the store). Nothing half-written was kept: "
            "free space there, or run the workflow in a folder on a larger disk, and run it again",
        ) from exc
