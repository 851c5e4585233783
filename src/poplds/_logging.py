"""Logging set-up shared by the workflow scripts and the command line."""

from __future__ import annotations

import logging
import sys
from os import PathLike

LOGGER_NAME = "poplds"


def get_logger() -> logging.Logger:
    """The package logger (``poplds``); handlers are the caller's business."""
    return logging.getLogger(LOGGER_NAME)


def setup_logging(log_file: str | PathLike[str] | None = None, level: int = logging.INFO) -> None:
    """Send poplds log records to standard error and, when given, to ``log_file``.

    Standard error is where Snakemake shows a job's output in the terminal, so progress and
    errors stay visible there; the log file keeps a copy next to the results.
    """
    logger = get_logger()
    logger.setLevel(level)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    fmt = logging.Formatter("%(asctime)s poplds %(levelname)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, mode="w"))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.propagate = False


def honour_interrupts() -> None:
    """Make SIGINT (Ctrl-C) stop the job with KeyboardInterrupt again. A process started with
    SIGINT ignored (as a job's process may be) inherits that, and Python then installs no
    handler of its own: a long fit would go on until killed by SIGTERM or SIGKILL."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _job_excepthook(kind, exc, tb) -> None:  # noqa: ANN001 - sys.excepthook's signature
    """A :class:`~poplds._errors.PopldsError` (bad input, a full disk, a damaged store) is
    told in its own words, in the terminal and the job's log, without a traceback; anything
    else is a bug and keeps its traceback. Python exits with status 1 either way."""
    from ._errors import PopldsError

    if isinstance(exc, PopldsError):
        get_logger().error("%s", exc)
    else:
        sys.__excepthook__(kind, exc, tb)


def setup_job(log_file: str | PathLike[str] | None, threads: int | None = None) -> None:
    """Set up a workflow job: logging (:func:`setup_logging`), errors a user can act on told
    without a traceback (:func:`_job_excepthook`) and, when given, torch's intra-op threads
    to the job's ``threads``. torch defaults to every core of the machine; two such jobs side
    by side, or one job on a cluster node shared with others, oversubscribe the cores and
    slow every fit many times over."""
    setup_logging(log_file)
    sys.excepthook = _job_excepthook
    honour_interrupts()
    if threads:
        import torch

        torch.set_num_threads(int(threads))
