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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._distributed import all_sum, broadcast, rank_and_size
from ._loss import DataTerm, LossTensors, assemble
from ._stage import Monitor, OptimizerBase, OptimizerSpec, StageProblem, register

#: Epochs over which the best epoch-mean loss must fall by more than ``tol x noise``.
WINDOW = 3

#: ``optimizer: auto`` considers SGD when an epoch has at least this many minibatch windows
#: (with fewer, its reads were not fewer than L-BFGS's).
SGD_MIN_WINDOWS = 128


def epoch_order(n_windows: int, seed: int, stage: str, epoch: int) -> np.ndarray:
    """The windows' order in one epoch: a permutation of ``range(n_windows)``."""
    tag = sum(ord(c) for c in stage)
    return np.random.default_rng([seed, tag, epoch]).permutation(n_windows)


def minibatch_loss_and_grad(
    term: DataTerm, win, y, C: torch.Tensor, X: torch.Tensor, tensors: LossTensors, n_windows: int
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


@dataclass(frozen=True)
class SGDOptions:
    """learning_rate: Adam's step relative to each parameter's root mean square;
    max_epochs: the stage's cap; minibatch_rows: time steps per window (the data term's
    windows, :class:`._loss.DataTerm`; here it keys checkpoints)."""

    learning_rate: float
    max_epochs: int
    minibatch_rows: int


class SGD(OptimizerBase):
    """The stage's minibatch Adam (module docstring; :class:`._stage.StageOptimizer`): a
    step is one epoch, recorded by its mean minibatch loss. ``passes`` counts the full
    passes over the data: epochs plus the two exact evaluations."""

    def __init__(self, problem: StageProblem, options: SGDOptions, carry: dict) -> None:
        self.problem = problem
        self.wins = problem.term.windows()
        groups = []
        for p in problem.params:
            size = float(torch.sqrt(torch.mean(p.detach() ** 2)))
            groups.append(
                {"params": [p], "lr": options.learning_rate * (size if size > 0 else 1.0)}
            )
        self.opt = torch.optim.Adam(groups)
        self.lr0 = groups[0]["lr"]
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt,
            mode="min",
            factor=0.5,
            patience=0,
            threshold=problem.tol,
            threshold_mode="abs",
        )
        self.epoch = 0
        self.steps = 0
        self.loss_start = float("nan")

    def begin(self) -> None:
        """The exact loss at the start (one pass)."""
        self.loss_start = self.problem.exact_loss()

    def step(self, monitor: Monitor) -> str | None:
        """One epoch: every window once, in the epoch's order, each rank taking its share."""
        problem, M = self.problem, len(self.wins)
        term, C, scale = problem.term, problem.C, problem.scale
        self.epoch += 1
        wins = self.wins
        order = [wins[k] for k in epoch_order(M, problem.seed, problem.stage, self.epoch)]
        order = order or [None]
        rank, world = rank_and_size()
        n_steps = -(-len(order) // world)  # each step takes one window per rank
        mine = [
            order[j * world + rank] if j * world + rank < len(order) else None
            for j in range(n_steps)
        ]
        total = 0.0
        for win, y in zip(mine, term.access.read_ahead(mine, C.device), strict=True):
            for p in problem.params:
                p.grad = None
            loss, gC = minibatch_loss_and_grad(
                term, win, y, C, problem.make_X(), problem.tensors, M
            )
            C.grad = gC
            for p in problem.params:  # in units of the loss's noise, as L-BFGS sees it
                p.grad = p.grad / scale
            self.opt.step()
            self.steps += 1
            total += float(loss)
        mean = total / n_steps
        self.plateau.step(mean / scale)
        monitor(mean, self.epoch)
        return None

    def note(self) -> str:
        return f", step x {self.opt.param_groups[0]['lr'] / self.lr0:.3g}"

    def state(self) -> dict[str, Any]:
        return {
            "params": self.problem.snapshot(),
            "opt": self.opt.state_dict(),
            "plateau": self.plateau.state_dict(),
            "steps": self.steps,
            "epoch": self.epoch,
            "loss_start": self.loss_start,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.problem.restore(state["params"])
        self.opt.load_state_dict(state["opt"])
        self.plateau.load_state_dict(state["plateau"])
        self.steps, self.epoch, self.loss_start = (
            state["steps"],
            state["epoch"],
            state["loss_start"],
        )

    def finish(self) -> dict[str, Any]:
        """The parameters stay at the last step (made the same on every rank); the exact loss
        there (one pass)."""
        with torch.no_grad():
            broadcast(*self.problem.params)  # every rank has the same values; this makes it exact
        for p in self.problem.params:
            p.grad = None
        return {
            "passes": self.epoch + 2,
            "epochs": self.epoch,
            "steps": self.steps,
            "windows": len(self.wins),
            "loss_start": self.loss_start,
            "loss": self.problem.exact_loss(),
        }


register(
    OptimizerSpec(
        name="sgd",
        summary="minibatch Adam over time windows, one read of the data per epoch",
        options=SGDOptions,
        make=SGD,
        window=WINDOW,
        cap="max_epochs",
        unit="epoch",
        log_every=5,
        expected_reads=100,  # measured: 73 (55 windows per epoch) to 100 (390 windows)
        eligible=lambda term: len(term.windows()) >= SGD_MIN_WINDOWS,
    )
)
