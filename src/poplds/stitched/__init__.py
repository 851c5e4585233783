"""Stitched linear dynamical system (Nonnenmacher, Turaga & Macke, NeurIPS 2017).

One LDS for all neurons of several partial recordings, fitted by matching time-lagged
covariances of the pairs recorded together; it predicts the covariances of pairs never recorded
together and gives every recording latent trajectories in one shared latent space.

- :func:`fit_store` — from a dataset store to the files of :class:`StitchedOutputs`, with
  :class:`StitchedSettings`.
- :func:`fit` — the fit itself, on any (time, neurons) arrays.
- :func:`smooth_recordings` — Kalman/RTS latents of each recording.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

if TYPE_CHECKING:
    from ._prepare import RecordingInput, prepare_data
    from .inference import Posterior, smooth_recordings
    from .models import StitchedFit, StitchedLDSParams, fit
    from .run import StitchedOutputs, fit_store
    from .settings import StitchedSettings

#: Where each public name lives. Imported on first use, so that ``poplds.stitched.plots`` (the
#: figure jobs) starts without torch.
_WHERE = {
    "RecordingInput": "._prepare",
    "prepare_data": "._prepare",
    "Posterior": ".inference",
    "smooth_recordings": ".inference",
    "StitchedFit": ".models",
    "StitchedLDSParams": ".models",
    "fit": ".models",
    "StitchedOutputs": ".run",
    "fit_store": ".run",
    "StitchedSettings": ".settings",
}


__getattr__ = lazy_getattr(__name__, _WHERE)


__all__ = [
    "Posterior",
    "RecordingInput",
    "StitchedFit",
    "StitchedLDSParams",
    "StitchedOutputs",
    "StitchedSettings",
    "fit",
    "fit_store",
    "prepare_data",
    "smooth_recordings",
]
