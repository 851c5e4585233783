"""Checkpoints of a fit in progress: written atomically, read back only when they belong to
the same fit (a fingerprint of its data and settings), deleted once the fit's outputs exist.

A checkpoint is a ``torch.save`` file of plain containers and tensors. Fits write one at the
boundaries of their own deterministic steps (an EM cycle, a block of L-BFGS iterations), so a
fit resumed from one follows exactly the path of an uninterrupted fit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._distributed import rank_and_size
from ._logging import get_logger

log = get_logger()


def fingerprint(*arrays: np.ndarray | torch.Tensor, **settings: Any) -> str:
    """sha256 of the arrays' bytes (NaN-safe) and of the settings (JSON)."""
    h = hashlib.sha256()
    for a in arrays:
        x = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        h.update(str(x.shape).encode() + str(x.dtype).encode())
        h.update(np.ascontiguousarray(x).tobytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


class Checkpointer:
    """Saves a fit's state to ``path`` at most every ``every_s`` seconds (and when asked to
    ``force``); :meth:`load` returns the saved state when its fingerprint matches."""

    def __init__(self, path: str | Path | None, key: str, every_s: float = 60.0) -> None:
        self.path = None if path is None else Path(path)
        self.key = key
        self.every_s = every_s
        self._last = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a damaged checkpoint is worth a line, not a failed run
            log.warning("%s: unreadable checkpoint (%s); starting afresh", self.path, exc)
            return None
        if state.get("key") != self.key:
            log.warning(
                "%s: checkpoint of another fit (data or settings changed); starting afresh",
                self.path,
            )
            return None
        log.info("%s: resuming from the checkpoint", self.path)
        return state["state"]

    def due(self) -> bool:
        """Whether :meth:`save` would write now (so that a caller builds the state only then)."""
        return self.path is not None and time.monotonic() - self._last >= self.every_s

    def save(self, state: dict[str, Any], force: bool = False) -> None:
        """Write ``state`` (on rank 0 only when the fit runs on several processes)."""
        if self.path is None or (not force and time.monotonic() - self._last < self.every_s):
            return
        if rank_and_size()[0] != 0:
            self._last = time.monotonic()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"key": self.key, "state": state}, tmp)
        os.replace(tmp, self.path)
        self._last = time.monotonic()


def remove_checkpoints(folder: str | Path | None) -> None:
    """Delete a fit's checkpoint folder once its outputs are written."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
