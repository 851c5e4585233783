"""Data parallelism on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), launched by
``torchrun``: every process (rank) computes its share of a pass or minibatch, the shares are
summed by all-reduce, and every rank then takes the same optimiser step, so all end with the
same parameters. Without an initialised process group everything runs in one process.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ._logging import get_logger

log = get_logger()


def rank_and_size() -> tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` unless a process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment(device: str | torch.device) -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1),
    with NCCL for CUDA devices and gloo otherwise; on CUDA each rank takes the GPU of its
    ``LOCAL_RANK``. ``device``: a device or a device setting (``auto``, ``cpu``, ``cuda``...).
    Returns whether a group is in use. Safe to call twice."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        if isinstance(device, str):
            from ._device import choose_device

            device = choose_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        log.info("rank %d of %d (%s backend)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: its ``LOCAL_RANK``'s GPU when ``device`` is CUDA."""
    if device.type == "cuda" and rank_and_size()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def all_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (nothing in one process)."""
    if rank_and_size()[1] > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast(*tensors: torch.Tensor, src: int = 0) -> None:
    """Overwrite each tensor with rank ``src``'s, in place (nothing in one process)."""
    if rank_and_size()[1] > 1:
        for t in tensors:
            dist.broadcast(t, src=src)


def launch(entry: Callable[..., Any], processes: int, args: tuple) -> None:
    """Run ``entry(*args)`` on ``processes`` local processes with the environment of a
    ``torchrun --standalone`` job (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, a rendezvous on a
    free local port), by torch's own elastic launcher; raises if any process fails. On a CPU
    each process gets an equal share of this process's threads."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    threads = max(1, torch.get_num_threads() // processes)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    log.info("launching %d processes (%d threads each)", processes, threads)
    elastic_launch(config, _with_threads)(threads, entry, *args)


def _with_threads(threads: int, entry: Callable[..., Any], *args: Any) -> Any:
    torch.set_num_threads(threads)
    return entry(*args)
