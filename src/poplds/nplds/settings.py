"""The Poisson LDS fits' settings, written once: the ``nplds`` block of a dataset's
configuration (``workflow/schemas/config.schema.yaml`` has the same defaults, and a test
checks that they agree)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._outputs import poisson_models
from .._settings import settings_from


@dataclass(frozen=True)
class NPLDSSettings:
    """Settings of one job of Poisson LDS fits (every model at one latent dimension k).

    heldout_trials: fraction of trials left out of every fit (drawn with ``seed``);
    heldout_neurons: fraction of neurons predicted from the others on those trials
    (co-smoothing); dynamics_drift: also fit the variant with ``A[r] = A + g[r] A1``;
    drift_min_trials: the drift GPs' shortest length-scale, in trials (what "slow" means);
    neuron_drift: the drift models also have each neuron's own drift e over trials;
    inputs: known inputs ``u[r, t]`` from the trials table (:func:`._trials.trial_inputs`),
    each ``{"column": name, "as": "event" | "value"}``, entering the dynamics as ``B u``;
    time_offset: every model has the time-in-trial log-rate offset f (:mod:`.vi`);
    max_iter: most EM iterations per fit; tol: converged when the bound rose by less than
    tol x |bound| over the last 10 iterations; seed: of the held-out draws (the fits are
    deterministic); device: ``auto``, ``cpu``, ``cuda`` or ``cuda:<k>``.
    """

    heldout_trials: float = 0.2
    heldout_neurons: float = 0.25
    dynamics_drift: bool = False
    drift_min_trials: float = 5.0
    neuron_drift: bool = False
    time_offset: bool = True
    inputs: tuple[Mapping[str, Any], ...] = ()
    max_iter: int = 3000
    tol: float = 1e-6
    seed: int = 0
    device: str = "auto"

    #: Fields that are not in the configuration file.
    PYTHON_ONLY = ()

    @classmethod
    def from_config(cls, block: Mapping[str, Any]) -> NPLDSSettings:
        """From a dataset's validated ``nplds`` block (``latent_dims`` is ignored)."""
        s = settings_from(cls, block, "nplds")
        return dataclasses.replace(s, inputs=tuple(dict(i) for i in s.inputs))

    @property
    def models(self) -> tuple[str, ...]:
        """The models fitted, in order: PLDS first (a drift fit that ends below its bound is
        fitted again from it), then N-PLDS and, with ``dynamics_drift``, the variant."""
        return poisson_models(self.dynamics_drift)
