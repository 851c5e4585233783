"""Minibatch stochastic-gradient moment matching: Adam over time windows of the recordings.

A minibatch is one window ``c`` of the data route (:class:`._loss.DataTerm`): rows
``[t0, t1)`` of one recording with all its neurons, plus the ``K-1`` rows before them. With
``M`` windows in all, the step's loss estimate is

    L_c = (model terms - 2 (D_moments + M D_c)) / P

where ``D_c`` is the window's data term and ``D_moments`` the exact data term of the
recordings on the moments route (which read no data). Since the windows' terms add up to the
data route's ``sum_r D_r`` exactly, ``E_c[L_c] = L~`` and its gradient is unbiased; the mean
of the ``M`` minibatch gradients of an epoch at a fixed point is the full-batch gradient.

An epoch visits every window exactly once, in an order drawn from ``(seed, stage, epoch)``:
deterministic, and the same after a resume. The data are read once per epoch (the next
window is read while this one computes).

Adam moves each parameter tensor with a step of ``learning_rate`` times its own root mean
square at the start (so steps are relative, whatever the units), halved whenever an epoch's
mean loss does not improve on the best by more than ``tol`` times the loss's sampling noise
(``ReduceLROnPlateau``). The stage has converged when the best epoch mean has fallen by at
most ``tol x noise`` over the last ``WINDOW`` epochs; it stops at ``max_epochs`` otherwise.
The exact full-batch loss is evaluated at the start and at the end (one pass each).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._distributed import all_sum, broadcast, rank_and_size
from .._logging import get_logger
from ._loss import DataTerm, assemble, loss_and_grad

log = get_logger()

#: Epochs over which the best epoch-mean loss must fall by more than ``tol x noise``.
WINDOW = 3


def epoch_order(n_windows: int, seed: int, stage: str, epoch: int) -> np.ndarray:
    """The windows' order in one epoch: a permutation of ``range(n_windows)``."""
    tag = sum(ord(c) for c in stage)
    return np.random.default_rng([seed, tag, epoch]).permutation(n_windows)


def minibatch_loss_and_grad(
    term: DataTerm, win, y, C: torch.Tensor, X: torch.Tensor, tensors: dict, n_windows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_c`` (module docstring) and its gradient in ``C``; ``X``'s through its graph.

    ``win``: this rank's window (None: none this step, or no window of the data route
    exists); with several ranks the step averages the ranks' windows, ``n_windows / count x
    sum`` of their terms, still unbiased."""
    with torch.no_grad():
        Xd, Cd = X.detach(), C.detach()
        D, gC, dX = term.moments_part(Cd, Xd)
        d, g, x = Cd.new_zeros(()), torch.zeros_like(Cd), torch.zeros_like(Xd)
        count = Cd.new_tensor(0.0 if win is None else 1.0)
        if win is not None:
            d, g, x = term.window(win, Cd, Xd, y)
        all_sum(d, g, x, count)
        if count > 0:
            f = n_windows / float(count)
            D, gC, dX = D + f * d, gC + f * g, dX + f * x
    return assemble(C, X, tensors, D, gC, dX)


def sgd(
    params: list[torch.Tensor],
    make_X: Callable[[], torch.Tensor],
    term: DataTerm,
    tensors: dict,
    *,
    seed: int,
    stage: str,
    learning_rate: float,
    max_epochs: int,
    tol: float,
    scale: float,
    trace: list[tuple[str, int, float]],
    log_every: int = 5,
    progress=None,
) -> dict[str, Any]:
    """Run the stage's SGD on ``params`` (``params[0]`` is ``C``; ``make_X()`` builds ``X``
    from the others) and leave them at the last step. Returns the record :func:`_lbfgs` gives
    (``passes`` counts the full passes over the data: epochs plus the two exact
    evaluations), plus ``epochs`` and ``steps``. With ``progress`` (a checkpointed fit,
    ``models._Progress``) the state is saved between epochs when due, and a stage started
    again continues from the last saved epoch on the same path."""
    C = params[0]
    t = time.perf_counter()
    wins = term.windows()
    M = len(wins)
    dev = C.device

    def exact() -> float:
        with torch.no_grad():
            X = make_X()
        loss, _ = loss_and_grad(term, C.detach(), X.detach(), tensors)
        return float(loss)

    groups = []
    for p in params:
        size = float(torch.sqrt(torch.mean(p.detach() ** 2)))
        groups.append({"params": [p], "lr": learning_rate * (size if size > 0 else 1.0)})
    opt = torch.optim.Adam(groups)
    lr0 = groups[0]["lr"]
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=0.5, patience=0, threshold=tol, threshold_mode="abs"
    )
    best: list[float] = []
    stop, steps, first = "max_epochs", 0, 1
    resumed = progress.resume(stage) if progress is not None else None
    if resumed is not None:
        with torch.no_grad():
            for p, v in zip(params, resumed["params"], strict=True):
                p.copy_(v)
        opt.load_state_dict(resumed["opt"])
        plateau.load_state_dict(resumed["plateau"])
        best[:], trace[:] = resumed["best"], resumed["trace"]
        steps, first, loss_start = resumed["steps"], resumed["epoch"] + 1, resumed["loss_start"]
    else:
        loss_start = exact()
    rank, world = rank_and_size()
    for epoch in range(first, max_epochs + 1):
        order = [wins[k] for k in epoch_order(M, seed, stage, epoch)] if M else [None]
        n_steps = -(-len(order) // world)  # each step takes one window per rank
        mine = [
            order[j * world + rank] if j * world + rank < len(order) else None
            for j in range(n_steps)
        ]
        rows = term.read_ahead(mine, dev)
        total = 0.0
        for win, y in zip(mine, rows, strict=True):
            for p in params:
                p.grad = None
            loss, gC = minibatch_loss_and_grad(term, win, y, C, make_X(), tensors, M)
            C.grad = gC
            for p in params:  # in units of the loss's noise, as L-BFGS sees it
                p.grad = p.grad / scale
            opt.step()
            steps += 1
            total += float(loss)
        mean = total / n_steps
        trace.append((stage, epoch, mean))
        plateau.step(mean / scale)
        best.append(min(mean, best[-1]) if best else mean)
        if epoch % log_every == 0:
            log.info(
                "%s: epoch %d / at most %d, mean loss %.6g, step x %.3g, %.1f s",
                stage,
                epoch,
                max_epochs,
                mean,
                opt.param_groups[0]["lr"] / lr0,
                time.perf_counter() - t,
            )
        if epoch > WINDOW and best[-1 - WINDOW] - best[-1] <= tol * scale:
            stop = "converged"
            break
        if progress is not None and progress.saver.due():
            progress.save_stage(
                stage,
                {
                    "params": [p.detach().cpu().clone() for p in params],
                    "opt": opt.state_dict(),
                    "plateau": plateau.state_dict(),
                    "best": list(best),
                    "trace": list(trace),
                    "steps": steps,
                    "epoch": epoch,
                    "loss_start": loss_start,
                },
            )
    with torch.no_grad():
        broadcast(*params)  # every rank has the same values; this makes it exact
    for p in params:
        p.grad = None
    loss_end = exact()
    epochs = len(best)
    return {
        "optimizer": "sgd",
        "passes": epochs + 2,
        "epochs": epochs,
        "steps": steps,
        "windows": M,
        "stop": stop,
        "converged": stop != "max_epochs",
        "loss_start": loss_start,
        "loss": loss_end,
        "seconds": time.perf_counter() - t,
    }
