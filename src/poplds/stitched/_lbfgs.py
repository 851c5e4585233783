"""Full-batch L-BFGS (strong Wolfe line search) over a stage's parameters.

A pass is one evaluation of loss and gradient (two products with the data); every pass,
line-search evaluations included, is one record of the stage's monitor (``_stage``), so a
line search that does not improve counts but never ends a stage by itself. L-BFGS sees the
loss in units of the loss's sampling noise ``scale``, so its first step is of a sensible size
whatever the data's units. The parameters end at the best evaluated point (torch's L-BFGS
may stop in the middle of a line search).

A step is a block of ``CHECKPOINT_BLOCK`` iterations when the stage is checkpointed (one
block of ``max_passes`` otherwise): a new block starts by evaluating the point the last one
ended on, which is not recorded, so the path and the passes are those of one uninterrupted
run, resumed or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._stage import Monitor, OptimizerBase, OptimizerSpec, StageProblem, register

#: L-BFGS iterations between two chances to save a checkpointed stage.
CHECKPOINT_BLOCK = 20


@dataclass(frozen=True)
class LBFGSOptions:
    """max_passes: the stage's cap on evaluations."""

    max_passes: int


class _Stop(Exception):
    """Raised from the closure to end torch's L-BFGS run (the monitor said stop)."""


class LBFGS(OptimizerBase):
    """The stage's L-BFGS run (:class:`._stage.StageOptimizer`)."""

    def __init__(self, problem: StageProblem, options: LBFGSOptions, carry: dict) -> None:
        self.problem = problem
        self.block = CHECKPOINT_BLOCK if problem.checkpointed else options.max_passes
        self.opt = torch.optim.LBFGS(
            problem.params,
            lr=1.0,
            max_iter=self.block,
            max_eval=options.max_passes
            + 25,  # the cap is the monitor's: L-BFGS must not stop first
            history_size=20,
            tolerance_grad=0.0,
            tolerance_change=0.0,
            line_search_fn="strong_wolfe",
        )
        self.best_params: list[torch.Tensor] | None = None
        self.repeat = False  # the next evaluation repeats the point the last block ended on
        self.stopped = False
        self.monitor: Monitor | None = None

    def _closure(self) -> torch.Tensor:
        if self.stopped:
            raise _Stop
        loss = self.problem.evaluate()
        scale = self.problem.scale
        for p in self.problem.params:  # in units of `scale`, contiguous: L-BFGS uses view()
            if p.grad is not None:
                p.grad = (p.grad / scale).contiguous()
        if self.repeat:
            self.repeat = False
            return loss / scale
        value = float(loss)
        best = self.monitor.best
        if not best or value < best[-1]:
            self.best_params = [p.detach().clone() for p in self.problem.params]
        self.stopped = self.monitor(value)
        return loss / scale

    def step(self, monitor: Monitor) -> str | None:
        """One block of iterations; ``no_descent`` when L-BFGS ended by itself (no descent
        direction: a stationary point to machine precision)."""
        self.monitor = monitor
        lbfgs_state = self.opt.state[self.problem.params[0]]  # torch keeps its counters here
        n0 = lbfgs_state.get("n_iter", 0)
        try:
            self.opt.step(self._closure)
        except _Stop:
            return None
        if lbfgs_state["n_iter"] - n0 < self.block:
            return "no_descent"
        self.repeat = True
        return None

    def state(self) -> dict[str, Any]:
        return {
            "params": self.problem.snapshot(),
            "opt": self.opt.state_dict(),
            "best_params": [v.cpu() for v in self.best_params or []],
            "repeat": self.repeat,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.problem.restore(state["params"])
        self.opt.load_state_dict(state["opt"])
        dev = self.problem.C.device
        self.best_params = [v.to(dev) for v in state["best_params"]] or None
        self.repeat = state["repeat"]

    def finish(self) -> dict[str, Any]:
        """Leave the parameters at the best evaluated point."""
        if self.best_params is not None:
            with torch.no_grad():
                for p, b in zip(self.problem.params, self.best_params, strict=True):
                    p.copy_(b)
        return {}


register(
    OptimizerSpec(
        name="lbfgs",
        summary="full-batch L-BFGS, one read of the data per pass",
        options=LBFGSOptions,
        make=LBFGS,
        window=10,
        log_every=25,
        expected_reads=300,  # measured: 61-373 passes over two stages
    )
)
