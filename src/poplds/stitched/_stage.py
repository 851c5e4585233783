"""One stage of a stitched fit, run the same way whatever the optimiser.

A fit (``models``) has two stages, free then linked. Each minimises the reduced loss ``L~``
(``_loss``) over its parameters ``[C, ...]``: ``C`` (N, n) first, the others building the
lagged latent covariances ``X`` (K, n, n) through ``make_X`` (a :class:`StageProblem`).

:func:`run_stage` alone runs a stage. It starts the optimiser or resumes it from a
checkpoint, hands it a :class:`Monitor` that records every loss the optimiser reports (the
trace, the best loss ``b_k`` after record k), logs progress, and ends the stage by the
convergence test

    b_{k-w} - b_k <= tol * scale

(``scale`` the sampling noise of the loss per pair, ``w`` the optimiser's window) or at the
optimiser's cap; between the optimiser's steps it saves the stage's state, so a stage
started again continues on the same path. An optimiser (:class:`StageOptimizer`) supplies
only its steps, its state and its final figures; :data:`REGISTRY` lists them, each with its
options (a frozen dataclass of :class:`~.settings.StitchedSettings` fields) and its modelled
cost, which ``optimizer: auto`` compares (``_optimizers.choose_optimizer``). Adding an
optimiser is one module and one :func:`register` call.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .._checkpoint import Checkpointer
from .._logging import get_logger
from ._loss import DataTerm, LossTensors, loss_and_grad

log = get_logger()


@dataclass(frozen=True)
class StageProblem:
    """What one stage minimises.

    stage: ``free`` or ``linked`` (names the stage in the trace, the log and checkpoints);
    params: the stage's leaf tensors, ``params[0]`` the loadings ``C`` (N, n); make_X: builds
    ``X`` (K, n, n) from ``params[1:]`` (differentiably); term, tensors: the data term and the
    bookkeeping arrays of the loss; tol: the stage's tolerance; scale: the loss's sampling
    noise per pair; seed: the fit's seed; checkpointed: whether the stage's state may be
    saved (an optimiser may then work in shorter blocks); objective: a full-batch loss to
    use instead of the loss of ``term`` (a reference fit in a benchmark).
    """

    stage: str
    params: list[torch.Tensor]
    make_X: Callable[[], torch.Tensor]
    term: DataTerm | None
    tensors: LossTensors | None
    tol: float
    scale: float
    seed: int = 0
    checkpointed: bool = False
    objective: Callable[[], torch.Tensor] | None = None

    @property
    def C(self) -> torch.Tensor:
        """The loadings (N, n), ``params[0]``."""
        return self.params[0]

    def evaluate(self) -> torch.Tensor:
        """One full pass: ``L~`` at the parameters, with ``C.grad`` set and the gradients of
        ``params[1:]`` formed afresh through ``X``'s graph."""
        if self.objective is not None:
            return self.objective()
        for p in self.params[1:]:
            p.grad = None
        loss, gC = loss_and_grad(self.term, self.C, self.make_X(), self.tensors)
        self.C.grad = gC
        return loss

    def exact_loss(self) -> float:
        """``L~`` at the parameters, no gradient kept (one full pass)."""
        with torch.no_grad():
            X = self.make_X()
        loss, _ = loss_and_grad(self.term, self.C.detach(), X.detach(), self.tensors)
        return float(loss)

    def restore(self, values: list[torch.Tensor]) -> None:
        """Copy saved ``values`` (host copies, one per parameter) into the parameters."""
        with torch.no_grad():
            for p, v in zip(self.params, values, strict=True):
                p.copy_(v)

    def snapshot(self) -> list[torch.Tensor]:
        """Host copies of the parameters (for a checkpoint)."""
        return [p.detach().cpu().clone() for p in self.params]


@dataclass
class StageRecord:
    """How a stage went: ``optimizer``; ``passes`` (reads of the data, or full-batch
    evaluations); ``stop`` (``converged``, the cap's name, or ``no_descent``: L-BFGS found no
    descent direction); ``converged`` (False at the cap); ``loss_start``, ``loss`` (``L~``
    before and after); ``seconds``; the optimisers' own figures where they have them:
    ``epochs``, ``steps``, ``windows`` (SGD), ``inner`` and ``pass_seconds`` (subspace)."""

    optimizer: str
    passes: int
    stop: str
    converged: bool
    loss_start: float
    loss: float
    seconds: float
    epochs: int | None = None
    steps: int | None = None
    windows: int | None = None
    inner: int | None = None
    pass_seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields that apply (None left out), as metrics.json and model.zarr hold them."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class Monitor:
    """Records the losses an optimiser reports (``monitor(value, index)``), logs progress and
    decides when the stage ends (module docstring): ``best[k-1]`` is ``b_k``; ``stop`` is
    None until the convergence test holds (``converged``) or ``index`` reaches the cap."""

    def __init__(
        self,
        problem: StageProblem,
        spec: OptimizerSpec,
        cap: int,
        trace: list[tuple[str, int, float]],
        note: Callable[[], str] | None = None,
    ) -> None:
        self.problem, self.spec, self.cap, self.trace = problem, spec, cap, trace
        self.note: Callable[[], str] = note or (lambda: "")
        self.best: list[float] = []
        self.stop: str | None = None
        self.t0 = time.perf_counter()

    def __call__(self, value: float, index: int | None = None) -> bool:
        """Record the loss ``value`` of step ``index`` (default: the count of records so
        far); True when the stage is to end."""
        best, w = self.best, self.spec.window
        index = len(best) + 1 if index is None else index
        self.trace.append((self.problem.stage, index, value))
        best.append(min(value, best[-1]) if best else value)
        k = len(best)
        if k % self.spec.log_every == 0:
            log.info(
                "%s: %s %d / at most %d, loss %.6g%s, %.1f s",
                self.problem.stage,
                self.spec.unit,
                index,
                self.cap,
                best[-1],
                self.note(),
                time.perf_counter() - self.t0,
            )
        if k > w and best[-1 - w] - best[-1] <= self.problem.tol * self.problem.scale:
            self.stop = "converged"
        elif index >= self.cap:
            self.stop = self.spec.cap
        return self.stop is not None

    def state(self) -> dict[str, Any]:
        return {"best": list(self.best), "trace": list(self.trace)}

    def load(self, state: dict[str, Any]) -> None:
        self.best[:] = state["best"]
        self.trace[:] = state["trace"]


class StageOptimizer(Protocol):
    """An optimiser's run of one stage (made by its :class:`OptimizerSpec`'s ``make``).

    :meth:`begin` starts afresh (it may read the data once, e.g. for the start's loss) or
    :meth:`load` continues from :meth:`state`; :meth:`step` advances to the next point where
    the state may be saved, reporting each loss to the monitor and returning as soon as the
    monitor says stop (it returns a stop reason only when it ended by itself); :meth:`finish`
    leaves the parameters at the stage's result and returns the :class:`StageRecord` fields
    it sets (by default ``passes`` is the number of records and ``loss_start``, ``loss`` the
    first and best recorded); :meth:`handoff` is what the next stage of the same start may
    reuse (checkpointable), taken back by :meth:`OptimizerSpec.restore`.
    :class:`OptimizerBase` gives the defaults of begin, note, finish and handoff."""

    def begin(self) -> None: ...

    def load(self, state: dict[str, Any]) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def step(self, monitor: Monitor) -> str | None: ...

    def note(self) -> str: ...

    def finish(self) -> dict[str, Any]: ...

    def handoff(self) -> Any: ...


class OptimizerBase:
    """The defaults of :class:`StageOptimizer` for an optimiser to inherit: nothing to do
    before the first step, no note in the progress line, no figures of its own for the
    stage's record, nothing handed to the next stage."""

    def begin(self) -> None:
        return None

    def note(self) -> str:
        return ""

    def finish(self) -> dict[str, Any]:
        return {}

    def handoff(self) -> Any:
        return None


def no_handoff(problem: StageProblem, handoff: Any) -> dict:
    """The ``restore`` of an optimiser that hands nothing to the next stage."""
    return {}


@dataclass(frozen=True)
class OptimizerSpec:
    """One entry of the registry.

    name: the value of ``stitched_lds.optimizer``; summary: one line for the docs; options: a
    frozen dataclass whose fields are :class:`~.settings.StitchedSettings` fields (what the
    optimiser reads from the settings; they also key its checkpoints); make: ``(problem,
    options, carry) -> StageOptimizer``, ``carry`` a dict the two stages of one start share;
    window: the convergence test's ``w``; cap: the options field that caps a stage (the
    stop reason at the cap); unit: what a record counts, for the log; log_every: records
    between two progress lines; expected_reads: reads of the data a fit is expected to take,
    for ``auto`` (None: ``auto`` never picks it); extra_flops: flops it adds per pass without
    reading the data; eligible: whether ``auto`` may pick it for this data term; restore:
    ``(problem, handoff) -> carry`` after a resumed stage.
    """

    name: str
    summary: str
    options: type
    make: Callable[[StageProblem, Any, dict], StageOptimizer]
    window: int
    cap: str = "max_passes"
    unit: str = "pass"
    log_every: int = 25
    expected_reads: float | None = None
    extra_flops: Callable[[DataTerm], float] | None = None
    eligible: Callable[[DataTerm], bool] | None = None
    restore: Callable[[StageProblem, Any], dict] = no_handoff

    def options_from(self, settings: Any) -> Any:
        """The options from :class:`~.settings.StitchedSettings` (fields of the same name)."""
        names = [f.name for f in dataclasses.fields(self.options)]
        return self.options(**{k: getattr(settings, k) for k in names})


#: The optimisers by name, as registered (``_optimizers.registry`` gives them in order).
REGISTRY: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add an optimiser to :data:`REGISTRY` (replacing one of the same name)."""
    REGISTRY[spec.name] = spec
    return spec


class Progress:
    """A checkpointed fit's record: each finished (start, stage) and the stage in progress,
    saved through a :class:`~poplds._checkpoint.Checkpointer`; ``start`` names the start
    being fitted."""

    def __init__(self, saver: Checkpointer) -> None:
        self.saver = saver
        saved = saver.load() or {}
        self.done: dict[str, Any] = saved.get("done", {})
        self.current: dict[str, Any] | None = saved.get("current")
        self.start = ""

    def _key(self, stage: str) -> str:
        return f"{self.start}/{stage}"

    def finished(self, stage: str) -> Any:
        return self.done.get(self._key(stage))

    def finish(self, stage: str, result: Any) -> None:
        self.done[self._key(stage)] = result
        self.current = None
        self.saver.save({"done": self.done, "current": None}, force=True)

    def resume(self, stage: str) -> dict[str, Any] | None:
        c = self.current
        return c["state"] if c is not None and c["key"] == self._key(stage) else None

    def save_stage(self, stage: str, state: dict[str, Any]) -> None:
        self.current = {"key": self._key(stage), "state": state}
        self.saver.save({"done": self.done, "current": self.current})


def run_stage(
    spec: OptimizerSpec,
    options: Any,
    problem: StageProblem,
    trace: list[tuple[str, int, float]],
    carry: dict,
    progress: Progress | None = None,
) -> StageRecord:
    """Run one stage (module docstring) and leave ``problem.params`` at its result.

    ``trace``: the fit's ``(stage, index, loss)`` list, extended in place; ``carry``: what
    the stages of one start share (the optimiser's handoff); ``progress``: a checkpointed
    fit's record. A stage that a checkpoint says finished is not run again: its parameters,
    trace, record and handoff are taken from it."""
    stage = problem.stage
    done = progress.finished(stage) if progress is not None else None
    if done is not None:
        problem.restore(done["params"])
        trace[:] = done["trace"]
        if done["handoff"] is not None:
            carry.update(spec.restore(problem, done["handoff"]))
        return done["record"]
    t = time.perf_counter()
    opt = spec.make(problem, options, carry)
    monitor = Monitor(problem, spec, int(getattr(options, spec.cap)), trace, opt.note)
    resumed = progress.resume(stage) if progress is not None else None
    if resumed is not None:
        opt.load(resumed["optimizer"])
        monitor.load(resumed["monitor"])
    else:
        opt.begin()
    while True:
        ended = opt.step(monitor)
        if monitor.stop is not None or ended is not None:
            break
        if progress is not None and progress.saver.due():
            progress.save_stage(stage, {"optimizer": opt.state(), "monitor": monitor.state()})
    stop = monitor.stop or ended
    best = monitor.best
    figures = {"passes": len(best), "loss_start": best[0], "loss": best[-1], **opt.finish()}
    record = StageRecord(
        optimizer=spec.name,
        stop=stop,
        converged=stop != spec.cap,
        seconds=time.perf_counter() - t,
        **figures,
    )
    if progress is not None:
        progress.finish(
            stage,
            {
                "params": problem.snapshot(),
                "record": record,
                "trace": list(trace),
                "handoff": opt.handoff(),
            },
        )
    return record
