"""Hierarchical non-stationary Poisson LDS over trials (Park, Bohner & Macke, NeurIPS 2015).

- :mod:`poplds.nplds.vi`: the variational EM, :func:`fit` and :class:`FitResult` (the model,
  the variational family and the bound are written out there);
- :mod:`poplds.nplds.model`: parameters, trial data, q's state, GP kernels and priors, the
  path prior and the bound (:func:`~poplds.nplds.model.elbo`);
- :mod:`poplds.nplds.estep`, :mod:`poplds.nplds.mstep`, :mod:`poplds.nplds.init`: the
  E-steps, the M-steps and the deterministic start;
- :mod:`poplds.nplds.evaluate`: held-out trials, co-smoothing, per-trial rates;
- :mod:`poplds.nplds.run`: from a dataset store to result files (:func:`fit_store`);
- :mod:`poplds.nplds.plots`: the report's figures;
- :mod:`poplds.nplds._blocktri`, :mod:`poplds.nplds._numerics`, :mod:`poplds.nplds._accelerate`:
  block-tridiagonal algebra, shared numerics, SQUAREM;
- :mod:`poplds.nplds.kalman_reference`: the exact latent-path posterior with Gaussian
  emissions (the Kalman/RTS smoother's answer), the reference of tests and benchmarks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

if TYPE_CHECKING:
    from .model import PLDSParams
    from .run import NPLDSOutputs, fit_store
    from .settings import NPLDSSettings
    from .vi import FitResult, fit

#: Where each public name lives. Imported on first use, so that ``poplds.nplds.plots`` (the
#: figure jobs) starts without torch.
_WHERE = {
    "PLDSParams": ".model",
    "NPLDSOutputs": ".run",
    "fit_store": ".run",
    "NPLDSSettings": ".settings",
    "FitResult": ".vi",
    "fit": ".vi",
}


__getattr__ = lazy_getattr(__name__, _WHERE)


__all__ = ["FitResult", "NPLDSOutputs", "NPLDSSettings", "PLDSParams", "fit", "fit_store"]
