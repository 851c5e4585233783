"""Hierarchical non-stationary Poisson LDS over trials (Park, Bohner & Macke, NeurIPS 2015).

- :mod:`poplds.nplds.vi`: the model and its variational EM (:func:`fit`);
- :mod:`poplds.nplds.evaluate`: held-out trials, co-smoothing, per-trial rates;
- :mod:`poplds.nplds.run`: from a dataset store to result files (:func:`fit_store`);
- :mod:`poplds.nplds.plots`: the report's figures;
- :mod:`poplds.nplds.inference`, :mod:`poplds.nplds._blocktri`: block-tridiagonal algebra and
  the exact latent-path posterior with Gaussian emissions (the Kalman/RTS smoother's answer).
"""

from .run import fit_store
from .vi import FitResult, PLDSParams, fit

__all__ = ["FitResult", "PLDSParams", "fit", "fit_store"]
