"""Subspace moment matching: each read of the data adds a gradient to a small basis of
loadings, and between reads the loss is minimised exactly over that basis, without the data.

This is the sequential subspace optimisation of Narkiss & Zibulevsky (2005, SESOP) fitted to
the structure of the loss (``_loss``): the data route enters it only through the projections
``z_g[t] = C_g' y_g[t]``, which are linear in ``C``. With the observed neurons' rows sorted by
group g, a current point ``D_0`` and directions ``D_1 .. D_m`` (each (N_obs, n)), a stage's
loadings are restricted to

    C_g = D_0g Gamma_g + sum_j gamma_jg D_jg,     Gamma_g (n, n), gamma_jg scalars        (1)

and its projections to

    z_g[t] = Gamma_g' p_0g[t] + sum_j gamma_jg p_jg[t],     p_jg[t] = D_jg' y_g[t]        (2)

with ``p`` stored once per direction (rows, G_r, n for each data-route recording). The loss
over (1) and the stage's own parameters (``X_s``, or ``A`` and ``L``) is then exact without
reading the data: eq. (2) of ``_loss`` on the projections, the model terms on ``C`` and the
moments route on ``C``. An inner L-BFGS minimises it to convergence; it starts at
``Gamma = I, gamma = 0``, the last point, so the loss never rises from one step to the next.

One *pass* over the data then does two products per row, as an L-BFGS pass does: the
projections of the direction queued by the pass before, and the data route's gradient
``sum_t y[t] dL/dz[t]'`` at the new point (``dL/dz`` is known from (2)). The gradient, made
orthogonal per group to ``D_0 Gamma`` and to the other directions and scaled to ``D_0``'s
norm, is the next queued direction; the basis keeps the last ``memory`` of them and the last
step ``D_0(new) - D_0(old)`` (whose projections are known too). The first pass of a fit forms
``p_0`` and the gradient at the start in one read (:meth:`._loss.DataTerm.full`); a second
stage starts from the first one's basis, without reading the data.

Each pass is one step; the stage has converged when the loss has fallen by at most ``tol``
times its sampling noise over the last ``WINDOW`` passes, and it stops at ``max_passes``
otherwise. The projections are float32 products accumulated in float64, as in ``_loss``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._logging import get_logger
from ._basis import MEMORY, Basis
from ._loss import DataTerm, LossTensors, assemble
from ._stage import Monitor, OptimizerBase, OptimizerSpec, StageProblem, register

log = get_logger()

#: Passes over which the loss must fall by more than ``tol x noise``.
WINDOW = 3

#: Iterations of the inner L-BFGS at most, per pass.
INNER_ITERATIONS = 60


def precondition(grad: torch.Tensor, X: torch.Tensor, basis: Basis, tensors: LossTensors):
    """``grad_g H_g^-1`` for each group (rows of ``grad`` (N_obs, n) in ``by_group`` order):
    ``H_g = sum_s sum_h o_gh(s) (X_s G_h X_s' + X_s' G_h X_s)``, ``G_h = C_h' C_h``, ``o`` the
    co-observed pairs, the Gauss-Newton curvature of the loss in one neuron's loadings with
    every other neuron fixed; a step of 1 along it is the least-squares update of each row
    (alternating least squares, all rows at once)."""
    C = basis.D[0]
    G = torch.stack([C[a:b].T @ C[a:b] for a, b in basis.bounds])
    XGX = torch.einsum("sab,hbc,sdc->shad", X, G, X)  # X_s G_h X_s'
    XtGX = torch.einsum("sba,hbc,scd->shad", X, G, X)  # X_s' G_h X_s
    H = torch.einsum("sgh,shad->gad", tensors.coobserved, XGX + XtGX)
    n = C.shape[1]
    H = H + 1e-9 * torch.einsum("gaa->g", H)[:, None, None] * torch.eye(n, dtype=H.dtype)
    out = torch.empty_like(grad)
    for g, (a, b) in enumerate(basis.bounds):
        out[a:b] = torch.linalg.solve(H[g], grad[a:b].T).T
    return out


def inner_solve(
    basis: Basis,
    stage_params: list[torch.Tensor],
    make_X: Callable[[], torch.Tensor],
    tensors: LossTensors,
    tol: float,
    scale: float,
) -> tuple[float, torch.Tensor, torch.Tensor, int]:
    """Minimise the loss over (1) and the stage's parameters by L-BFGS, from ``Gamma = I,
    gamma = 0`` (the point) and the stage's parameters as they are, which are left at the best
    point. Returns (loss, Gamma, gamma, evaluations); the loss is exact.

    Where the lag-0 diagonal's share of the pairs is below ``LINEAR_DIAGONAL_SHARE``, the
    solve takes it to first order at the start, so its evaluations touch no neuron-sized
    array; the exact loss is evaluated at the end, and if it differs from the expansion by
    more than ``tol / 100`` times the noise, later solves of this basis are exact."""
    G, n = len(basis.bounds), basis.D[0].shape[1]
    dev = basis.D[0].device
    Gam = torch.eye(n, dtype=torch.float64, device=dev).repeat(G, 1, 1).requires_grad_(True)
    gam = torch.zeros((basis.m, G), dtype=torch.float64, device=dev, requires_grad=True)
    params = [Gam, gam, *stage_params]
    diagonal = None
    if basis.linear_diagonal_ok:
        diagonal = basis.linear_diagonal(Gam, gam, make_X()[0], tensors)
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=INNER_ITERATIONS,
        history_size=20,
        tolerance_grad=0.0,
        tolerance_change=1e-3 * tol,
        line_search_fn="strong_wolfe",
    )
    record: dict[str, Any] = {"evals": 0}

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = basis.loss(Gam, gam, make_X(), tensors, diagonal)
        (loss / scale).backward()
        for q in params:  # contiguous: L-BFGS flattens with view()
            if q.grad is not None:
                q.grad = q.grad.contiguous()
        record["evals"] += 1
        value = float(loss.detach())
        if "best" not in record or value < record["best"]:
            record["best"] = value
            record["state"] = [v.detach().clone() for v in params]
        return loss.detach() / scale

    opt.step(closure)
    Gb, gb, *rest = record["state"]
    with torch.no_grad():
        for p, v in zip(stage_params, rest, strict=True):
            p.copy_(v)
        value = record["best"]
        if diagonal is not None:
            value = float(basis.loss(Gb, gb, make_X(), tensors))
            if abs(value - record["best"]) > 1e-2 * tol * scale:
                log.info(
                    "subspace: the diagonal's expansion is off by %.3g; exact from now",
                    value - record["best"],
                )
                basis.linear_diagonal_ok = False
    return value, Gb, gb, record["evals"]


@dataclass(frozen=True)
class SubspaceOptions:
    """max_passes: the stage's cap on passes over the data."""

    max_passes: int


class Subspace(OptimizerBase):
    """The stage's subspace moment matching (module docstring; :class:`._stage.StageOptimizer`).

    A step is an inner solve over the basis, recorded at the pass count, and then, unless the
    stage ends, one pass over the data. ``carry["basis"]`` holds the basis between the stages
    of one start; the first stage forms it from one pass (:meth:`begin`). Its record adds
    ``inner`` (inner evaluations in all) and ``pass_seconds`` (time in passes over the data)."""

    def __init__(self, problem: StageProblem, options: SubspaceOptions, carry: dict) -> None:
        self.problem, self.carry = problem, carry
        self.basis: Basis | None = carry.get("basis")
        self.passes = 0
        self.pass_seconds = 0.0
        self.inner = 0
        self.loss_start: float | None = None

    def begin(self) -> None:
        """The first stage's first pass: the start's projections and gradient in one read."""
        if self.basis is not None:
            return
        problem = self.problem
        term, tensors, C = problem.term, problem.tensors, problem.C
        basis = Basis(term, tensors)
        keep: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            X0 = problem.make_X()
            t_read = time.perf_counter()
            D, gC, dX = term.full(C.detach(), X0.detach(), keep=keep)
            self.pass_seconds += time.perf_counter() - t_read
        loss0, grad = assemble(C.detach(), X0.detach(), tensors, D, gC, dX)
        self.passes += 1
        basis.start(C.detach()[basis.order].clone(), keep)
        basis.queue(precondition(grad[basis.order], X0.detach(), basis, tensors))
        self.loss_start = float(loss0)
        self.basis = self.carry["basis"] = basis

    def step(self, monitor: Monitor) -> str | None:
        problem, basis = self.problem, self.basis
        tensors = problem.tensors
        stage_params = problem.params[1:]
        value, Gb, gb, evals = inner_solve(
            basis, stage_params, problem.make_X, tensors, problem.tol, problem.scale
        )
        self.inner += evals
        if self.loss_start is None:
            self.loss_start = value
        stop = monitor(value, self.passes)
        basis.move(Gb, gb)
        with torch.no_grad():
            problem.C.copy_(basis.full_loadings(basis.D[0]))
        if stop:
            return None
        # one pass: the queued direction's projections and the gradient at the new point
        t_read = time.perf_counter()
        with torch.no_grad():
            X = problem.make_X()
        grad = basis.point_gradient(X, tensors)
        self.pass_seconds += time.perf_counter() - t_read
        self.passes += 1
        basis.queue(precondition(grad, X, basis, tensors))
        return None

    def state(self) -> dict[str, Any]:
        return {
            "params": self.problem.snapshot(),
            "basis": self.basis.state(),
            "passes": self.passes,
            "inner": self.inner,
            "loss_start": self.loss_start,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` (with several ranks, after one pass that forms the
        projections again)."""
        basis = Basis(self.problem.term, self.problem.tensors)
        self.passes = state["passes"] + basis.load(state["basis"])
        self.problem.restore(state["params"])
        self.inner, self.loss_start = state["inner"], state["loss_start"]
        self.basis = self.carry["basis"] = basis

    def finish(self) -> dict[str, Any]:
        fields = {"passes": self.passes, "inner": self.inner, "pass_seconds": self.pass_seconds}
        return {**fields, "loss_start": self.loss_start}

    def handoff(self) -> dict[str, Any]:
        return self.basis.state()


def _restore(problem: StageProblem, handoff: dict[str, Any]) -> dict:
    """The basis a finished stage handed on, for the next stage of a resumed fit."""
    basis = Basis(problem.term, problem.tensors)
    basis.load(handoff)
    return {"basis": basis}


def _extra_flops(term: DataTerm) -> float:
    """Flops a pass adds without reading the data: forming the lagged moments of the
    projections, ``2 T_r d_r^2 K`` with ``d_r = (MEMORY + 2) G_r n`` per data-route
    recording, and the inner solve, about ``INNER_ITERATIONS`` evaluations of
    ``6 N n (n + MEMORY + 1)``."""
    data, n, K = term.data, term.n_latent, term.data.lags
    extra = 0.0
    for rec, how in zip(data.recordings, term.routes, strict=True):
        if how == "data":
            extra += 2.0 * rec.n_time * ((MEMORY + 2) * len(rec.slices) * n) ** 2 * K
    if "data" in term.routes:
        extra += INNER_ITERATIONS * 6.0 * int(np.sum(data.group_of >= 0)) * n * (n + MEMORY + 1)
    return extra


register(
    OptimizerSpec(
        name="subspace",
        summary=(
            "each read adds the gradient to a small basis of loadings and the loss is "
            "minimised exactly over it without the data"
        ),
        options=SubspaceOptions,
        make=Subspace,
        window=WINDOW,
        log_every=5,
        expected_reads=30,  # measured 8-16; taken at twice the most measured
        extra_flops=_extra_flops,
        restore=_restore,
    )
)
