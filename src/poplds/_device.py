"""The compute device of a fit, chosen the same way for both model families."""

from __future__ import annotations

import torch

from ._errors import InputError
from ._logging import get_logger

log = get_logger()


def choose_device(device: str = "auto", where: str = "stitched_lds.device") -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU (logged once). ``where``
    names the setting in the error raised when CUDA is asked for but missing."""
    if device == "auto":
        if torch.cuda.is_available():
            dev = torch.device("cuda")
            log.info("device: %s (%s)", dev, torch.cuda.get_device_name(dev))
            return dev
        log.info("device: cpu (no CUDA device found)")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(where, f"{device!r} asked for, but CUDA is not available")
    return dev
