"""One stage loop for every optimiser: a new optimiser is one registry entry, the registry
agrees with the configuration schema and the README, and the loop's convergence test is the
one documented."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, simulated

from poplds import stitched
from poplds.stitched import StitchedSettings
from poplds.stitched._optimizers import BUILTIN, register, registry
from poplds.stitched._stage import (
    REGISTRY,
    Monitor,
    OptimizerBase,
    OptimizerSpec,
    StageProblem,
)


@dataclass(frozen=True)
class AdamOptions:
    """The toy's options: fields of StitchedSettings."""

    max_passes: int
    learning_rate: float


class FullBatchAdam(OptimizerBase):
    """A toy optimiser: full-batch Adam, one pass per step, steps relative to each
    parameter's size."""

    def __init__(self, problem: StageProblem, options: AdamOptions, carry: dict) -> None:
        self.problem = problem
        self.opt = torch.optim.Adam(
            [
                {"params": [p], "lr": options.learning_rate * float(p.detach().abs().mean())}
                for p in problem.params
            ]
        )

    def step(self, monitor: Monitor) -> str | None:
        self.opt.zero_grad()
        loss = self.problem.evaluate()
        if not monitor(float(loss)):
            self.opt.step()
        return None

    def state(self) -> dict[str, Any]:
        return {"params": self.problem.snapshot(), "opt": self.opt.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        self.problem.restore(state["params"])
        self.opt.load_state_dict(state["opt"])


def test_a_toy_optimizer_added_through_the_registry_alone_fits(monkeypatch, tmp_path):
    """Registering one OptimizerSpec is all a new optimiser needs: the settings accept its
    name, the stage loop runs it (trace, convergence test or cap, checkpoint), the fit's
    record names it, and its fit lowers the loss towards L-BFGS's."""
    monkeypatch.setitem(REGISTRY, "adam_full", None)  # the entry is removed after the test
    spec = register(
        OptimizerSpec(
            name="adam_full",
            summary="full-batch Adam (a test's toy)",
            options=AdamOptions,
            make=FullBatchAdam,
            window=10,
        )
    )
    assert list(registry())[-1] == "adam_full"
    p, recs = simulated(N=40, n=2, overlap=12, T=2000, seed=3)
    settings = StitchedSettings(
        lags=4, device="cpu", optimizer="adam_full", max_passes=150, learning_rate=0.02
    )
    fit = stitched.fit(recs, 40, 2, settings, checkpoint=tmp_path / "fit.ckpt")
    info = fit.info
    assert info.optimizer == "adam_full" and info.free.optimizer == "adam_full"
    for record in (info.free, info.linked):
        assert record.stop in ("converged", "max_passes")
        assert record.passes == sum(1 for s, _, _ in fit.trace if s == record_stage(fit, record))
        assert record.loss <= record.loss_start
    assert info.linked.loss < info.free.loss_start  # it moved from the warm start
    reference = stitched.fit(recs, 40, 2, StitchedSettings(lags=4, device="cpu"))
    scale = info.noise_floor
    assert (info.linked.loss - reference.info.linked.loss) / scale < 5.0
    assert spec.expected_reads is None  # so auto never takes it
    assert stitched.fit(recs, 40, 2, StitchedSettings(lags=4, device="cpu")).info.optimizer in (
        BUILTIN
    )


def record_stage(fit, record) -> str:
    return "free" if record is fit.info.free else "linked"


def test_the_registry_agrees_with_the_schema_and_the_readme():
    """The config schema's optimizer enum is ``auto`` and the built-in registry, its
    description gives each built-in optimiser's registry summary, and the README names each."""
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())

    def find(node):
        if isinstance(node, dict):
            if "optimizer" in node.get("properties", {}):
                return node["properties"]["optimizer"]
            for v in node.values():
                got = find(v)
                if got is not None:
                    return got
        return None

    entry = find(schema)
    builtin = [name for name in registry() if name in BUILTIN]
    assert entry["enum"] == ["auto", *builtin]
    readme = (REPO / "README.md").read_text()
    for name in builtin:  # the schema's sentence on each is its registry summary
        assert f"`{name}` ({registry()[name].summary}" in entry["description"], name
        assert f"- `{name}`:" in readme, name


@pytest.mark.parametrize("name", BUILTIN)
def test_each_builtin_reads_its_options_from_the_settings(name):
    spec = registry()[name]
    options = spec.options_from(StitchedSettings(max_passes=7, max_epochs=9))
    assert getattr(options, spec.cap) == {"max_passes": 7, "max_epochs": 9}[spec.cap]
    assert spec.window >= 1 and spec.expected_reads is not None


def test_the_monitor_stops_by_the_documented_window_and_at_the_cap():
    """b_{k-w} - b_k <= tol * scale ends a stage; otherwise it ends at the cap."""
    problem = StageProblem("free", [torch.zeros(1)], lambda: None, None, None, 0.1, 1.0)
    spec = OptimizerSpec("t", "", AdamOptions, FullBatchAdam, window=3)
    trace: list = []
    m = Monitor(problem, spec, cap=100, trace=trace)
    assert not any(m(v) for v in (5.0, 4.0, 3.0, 2.0))  # falling by 1 a step: no stop
    assert not m(1.95)  # b_2 - b_5 = 4 - 1.95 > 0.1
    assert not m(1.94)  # b_3 - b_6 = 3 - 1.94 > 0.1
    assert m(1.93)  # b_4 - b_7 = 2 - 1.93 <= 0.1
    assert m.stop == "converged" and [k for _, k, _ in trace] == list(range(1, 8))
    capped = Monitor(problem, spec, cap=3, trace=[])
    assert not capped(3.0) and not capped(2.0) and capped(1.0)
    assert capped.stop == "max_passes"
