"""The stitched LDS's fit settings, written once: the ``stitched_lds`` block of a dataset's
configuration (``workflow/schemas/config.schema.yaml`` has the same defaults, and a test
checks that they agree)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._settings import settings_from


@dataclass(frozen=True)
class StitchedSettings:
    """Settings of one stitched LDS fit (each latent dimension n is its own fit).

    lags: K, the lags 0..K-1 whose covariances are matched; heldout_fraction: fraction of
    co-observed pairs kept out of the fit to score it; seed: of the warm start, the held-out
    split and the restarts; device: ``auto``, ``cpu``, ``cuda`` or ``cuda:<k>``; restarts:
    extra random starts (the lowest loss wins); max_passes: most loss-and-gradient passes
    per stage; tol: a stage has converged when its best loss falls by less than tol times
    the loss's sampling noise per pair over the optimiser's window (L-BFGS 10 passes, SGD 3
    epochs, subspace 3 passes; the free stage uses 10 tol); optimizer: a registered
    optimiser (``lbfgs``, ``sgd``, ``subspace``, see ``_stage.registry``) or ``auto`` (the
    one of least modelled cost, ``_stage.choose_optimizer``);
    minibatch_rows: time steps per SGD minibatch; max_epochs: SGD's cap per stage;
    learning_rate: Adam's step relative to each parameter's size; processes: data-parallel
    processes on this machine (torch.distributed; one per GPU);
    max_device_bytes: Python only, the most bytes of data held on the device (more is
    streamed from the store each pass; None: as much as fits); route: Python only, how each
    recording's data term is computed (``auto``, ``data`` or ``moments``, see
    ``poplds.stitched._loss``; the same loss either way); validation_fraction: at most this
    fraction of each recording's shared neurons is hidden in it for the stitch validation
    (0: none; ``poplds.stitched.validation``); validation_keep: neurons every overlap of two
    recordings keeps in the validation (None: n + 2; the workflow sets the largest latent
    dimension tried + 2, so that every n is validated on the same pairs); bootstrap:
    moving-block bootstrap replicates (0: no intervals; ``poplds.stitched.bootstrap``);
    interval_level: the intervals' nominal coverage.
    """

    lags: int = 10
    heldout_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    restarts: int = 0
    max_passes: int = 2000
    tol: float = 1e-3
    optimizer: str = "auto"
    minibatch_rows: int = 256
    max_epochs: int = 200
    learning_rate: float = 0.03
    processes: int = 1
    max_device_bytes: float | None = None
    route: str = "auto"
    validation_fraction: float = 0.3
    validation_keep: int | None = None
    bootstrap: int = 20
    interval_level: float = 0.9

    #: Fields that are not in the configuration file.
    PYTHON_ONLY = ("max_device_bytes", "route")

    @classmethod
    def from_config(cls, block: Mapping[str, Any]) -> StitchedSettings:
        """From a dataset's validated ``stitched_lds`` block (``latent_dims`` is ignored)."""
        return settings_from(cls, block, "stitched_lds")
