"""Held-out evaluation of fitted Poisson LDS models over trials.

Held-out trials are left out of the fit. Their modulator comes from the GP conditional given
the training trials' q(h), integrating over its variance::

    h*_j ~ N(K*_j K_j^-1 hm_j,  K**_j - K*_j K_j^-1 (K_j - hS_j) K_j^-1 K*_j')

and likewise g* for the dynamics variant and e* for the neurons' own drift. Scores, all in
the units of the Neural Latents Benchmark (bits per spike against each neuron's mean rate
over the evaluated data)::

    bits/spike = [LL(rate) - LL(mean rate)] / (spikes * ln 2),   LL = sum y log rate - rate

- trial prediction: rates of a held-out trial before seeing any of its spikes,
  ``E[exp(c'(x_t + h*) + d)]`` with x_t from the prior of the path;
- co-smoothing: q(x) and q(h*) of a held-out trial inferred from the held-in neurons, then
  ``E[exp(c'(x_t + h*) + d)]`` for the held-out neurons;
- per-trial mean rate (Park et al. 2015): the mean over bins of the predicted rate of each
  trial, from q(h) on training trials and the GP conditional on held-out ones, against the
  observed mean, as an RMSE in Hz.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._linalg import sym
from . import _numerics as numerics
from . import bands, estep, init, model, vi


def gp_conditional(
    p: model.PLDSParams, st: model.VIState, n_train: torch.Tensor, n_test: torch.Tensor
) -> model.GPPriors:
    """GP conditionals of h, g and e at trial numbers n_test given the training q (module
    docstring): means (k, R*) / (R*,) / (N, R*), covariances (k, R*, R*) / (R*, R*) /
    (N, R*, R*)."""

    def conditional(s2, tau, m, S):
        return _conditional(
            model.se_kernel(n_train, s2, tau),
            model.se_cross_kernel(n_test, n_train, s2, tau),
            model.se_kernel(n_test, s2, tau),
            m,
            S,
        )

    hmu = hK = gmu = gK = emu = eK = None
    if p.drift:
        hmu, hK = conditional(torch.exp(p.log_sigma2), torch.exp(p.log_tau), st.hm.T, st.hS)
    if p.dynamics_drift:
        tau = torch.exp(p.log_tau_g).reshape(1)
        gmu, gK = conditional(n_train.new_ones(1), tau, st.gm[None], st.gS[None])
        gmu, gK = gmu[0], gK[0]
    if p.neuron_drift:
        s2 = torch.exp(p.log_se2)
        emu, eK = conditional(s2, torch.exp(p.log_le).expand(len(s2)), st.em.T, st.eS)
    return model.GPPriors(hmu, hK, gmu, gK, emu, eK)


def _conditional(K, Ks, Kss, m, S):
    L = torch.linalg.cholesky(K)
    Ai = torch.cholesky_solve(Ks.mT, L)  # K^-1 K*'  (J, R, R*)
    mean = (Ai.mT @ m[..., None])[..., 0]
    cov = Kss - Ai.mT @ (K - S) @ Ai
    return mean, sym(cov)


def predicted_log_rates(
    p: model.PLDSParams,
    R: int,
    T: int,
    h_mean: torch.Tensor | None,
    h_var: torch.Tensor | None,
    g_mean: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    e: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(R, T, N) ``log E[rate]`` before seeing the trials' spikes: x from the prior of the
    path (dynamics ``A + g_mean A1``), h ~ N(h_mean, diag h_var) (R, k) (None: h = 0), the
    offset from its q, the neurons' own drift ``e ~ N(e[0], diag e[1])`` (R, N) (None: 0)."""
    mean, cov = model.prior_path_moments(p, R, T, u, g_mean)
    if h_mean is not None:
        mean = mean + h_mean[:, None, :]
        cov = cov + torch.diag_embed(h_var)[:, None]
    log_rate = mean @ p.C.T + p.d + 0.5 * numerics.quad_diag(p.C, cov).reshape(R, T, -1)
    log_rate = log_rate + p.offset_log_rate()
    if e is not None:
        log_rate = log_rate + (e[0] + 0.5 * e[1])[:, None, :]
    return log_rate


def bits_per_spike(y: torch.Tensor, log_rate: torch.Tensor) -> float:
    """NLB bits per spike of predicted log rates against each neuron's mean rate over y.
    y, log_rate: (R, T, N); bins where y is NaN (missing) are left out."""
    o = ~torch.isnan(y)
    y0 = torch.where(o, y, torch.zeros_like(y))
    spikes = float(y0.sum())
    if spikes == 0:
        return math.nan
    null = (y0.sum((0, 1)) / o.sum((0, 1)).clamp(min=1)).clamp(min=1e-12)
    ll = torch.where(o, y0 * log_rate - torch.exp(log_rate), torch.zeros_like(y0)).sum()
    ll0 = torch.where(o, y0 * torch.log(null) - null, torch.zeros_like(y0)).sum()
    return float((ll - ll0) / (spikes * math.log(2)))


def trial_mean(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(R, N) mean over each trial's bins of x (R, T, N), over the bins where ``like`` is not
    NaN (the observed bins of the data x is compared with)."""
    o = ~torch.isnan(like)
    return torch.where(o, x, torch.zeros_like(x)).sum(1) / o.sum(1).clamp(min=1)


def infer_trials(
    y: torch.Tensor,
    n_test: torch.Tensor,
    p: model.PLDSParams,
    gp: model.GPPriors,
    mask: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-8,
) -> model.VIState:
    """q of new trials under fixed parameters and priors ``gp`` (e.g. the GP conditional),
    from the neurons in ``mask`` only; E-steps until the bound's relative change is below
    tol."""
    data = model.TrialData(y, n_test, u, mask)
    _, st = init.initial_state(data, p, gp, learn=False)
    last = float(model.elbo(data, p, st, gp))
    for _ in range(max_iter):
        st = estep.estep(data, p, st, gp)
        value = float(model.elbo(data, p, st, gp))
        if abs(value - last) <= tol * abs(value):
            break
        last = value
    return st


def evaluate(
    fit: vi.FitResult,
    y_train: torch.Tensor,
    n_train: torch.Tensor,
    y_test: torch.Tensor,
    n_test: torch.Tensor,
    heldout_neurons: np.ndarray,
    bin_size_s: float,
    u_train: torch.Tensor | None = None,
    u_test: torch.Tensor | None = None,
    min_drift_trials: float = model.TAU_RANGE[0],
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Scores of one fitted model (module docstring) and the per-trial quantities behind them.

    y_train (R, T, N), n_train (R,): the fit's trials; y_test (R*, T, N), n_test (R*,):
    held-out trials (R* may be 0); heldout_neurons: (N,) bool, the co-smoothing targets.
    Returns (scores, arrays) with arrays ``h_mean``, ``h_var`` (R + R*, k) and ``g_mean``,
    ``g_var`` (R + R*,) and (neurons' own drift) ``e_mean``, ``e_var`` (R + R*, N) over
    training then held-out trials, ``rate`` (R + R*, N) the predicted per-trial mean rate
    in Hz, with the drift ``h_band_mean``, ``h_band_var`` and ``h_band_var_centred`` (the
    variance of h[r] less its mean over all trials) (R + R*, k), h's posterior with
    its GP hyperparameters integrated out (:mod:`.bands`; for the drift's bands, whose
    length-scales start at ``min_drift_trials``) and ``C_cov`` (N, k, k) the loadings'
    covariance (:func:`.bands.loading_covariance`), and the scored
    log rates ``heldout_log_rate`` (R*, T, N) and
    ``cosmoothing_log_rate`` (R*, T, held-out neurons) when there are held-out trials.
    """
    p, st = fit.params, fit.state
    R, T, N = y_train.shape
    k = p.C.shape[1]
    Rs = y_test.shape[0]
    dt, dev = y_train.dtype, y_train.device
    zeros = lambda *s: torch.zeros(s, dtype=dt, device=dev)  # noqa: E731
    if Rs:
        cond = gp_conditional(p, st, n_train, n_test)
    else:
        cond = model.GPPriors(None, None)
    h_train = (st.hm, st.hv) if p.drift else (zeros(R, k), zeros(R, k))
    h_test = (
        (cond.hmu.T, torch.diagonal(cond.hK, dim1=-2, dim2=-1).T)
        if p.drift and Rs
        else (zeros(Rs, k), zeros(Rs, k))
    )
    g_train = (st.gm, torch.diagonal(st.gS)) if p.dynamics_drift else (None, None)
    g_test = (cond.gmu, torch.diagonal(cond.gK)) if p.dynamics_drift and Rs else (None, None)
    e_train = (st.em, st.ev) if p.neuron_drift else None
    e_test = None
    if p.neuron_drift and Rs:
        e_test = (cond.emu.T, torch.diagonal(cond.eK, dim1=-2, dim2=-1).T)

    log_rate_train = predicted_log_rates(p, R, T, *h_train, g_train[0], u_train, e_train)
    scores: dict[str, float] = {}
    rate_train = trial_mean(torch.exp(log_rate_train), y_train) / bin_size_s
    obs_train = trial_mean(y_train, y_train) / bin_size_s
    arrays = {"h_mean": h_train[0], "h_var": h_train[1], "rate": rate_train}
    if p.drift:  # the drift band: the hyperparameters integrated out
        data = model.TrialData(y_train, n_train, u_train)
        band = bands.drift_band(data, p, st, n_test, min_drift_trials)
        arrays["h_band_mean"], arrays["h_band_var"] = band.mean, band.var
        arrays["h_band_var_centred"] = band.var_centred
        arrays["C_cov"] = bands.loading_covariance(data, p, st)
    if p.dynamics_drift:
        arrays["g_mean"], arrays["g_var"] = g_train
    if p.neuron_drift:
        arrays["e_mean"], arrays["e_var"] = e_train
    sq_train = ((rate_train - obs_train) ** 2).sum()
    if Rs:
        log_rate_test = predicted_log_rates(p, Rs, T, *h_test, g_test[0], u_test, e_test)
        scores["heldout_trial_bits_per_spike"] = bits_per_spike(y_test, log_rate_test)
        arrays["heldout_log_rate"] = log_rate_test
        rate_test = trial_mean(torch.exp(log_rate_test), y_test) / bin_size_s
        obs_test = trial_mean(y_test, y_test) / bin_size_s
        scores["rate_rmse_heldout_hz"] = float(((rate_test - obs_test) ** 2).mean().sqrt())
        scores["rate_rmse_hz"] = float(
            ((sq_train + ((rate_test - obs_test) ** 2).sum()) / ((R + Rs) * N)).sqrt()
        )
        arrays["h_mean"] = torch.cat([h_train[0], h_test[0]])
        arrays["h_var"] = torch.cat([h_train[1], h_test[1]])
        arrays["rate"] = torch.cat([rate_train, rate_test])
        if p.dynamics_drift:
            arrays["g_mean"] = torch.cat([g_train[0], g_test[0]])
            arrays["g_var"] = torch.cat([g_train[1], g_test[1]])
        if p.neuron_drift:
            arrays["e_mean"] = torch.cat([e_train[0], e_test[0]])
            arrays["e_var"] = torch.cat([e_train[1], e_test[1]])
        # co-smoothing: infer each held-out trial from the held-in neurons
        held = torch.as_tensor(heldout_neurons, device=dev)
        if bool(held.any()) and not bool(held.all()):
            q = infer_trials(y_test, n_test, p, cond, mask=~held, u=u_test)
            mean, log_lam = model.expected_log_rate(p, q)
            scores["cosmoothing_bits_per_spike"] = bits_per_spike(
                y_test[..., held], log_lam[..., held]
            )
            arrays["cosmoothing_log_rate"] = log_lam[..., held]
        else:
            scores["cosmoothing_bits_per_spike"] = math.nan
    else:
        scores["heldout_trial_bits_per_spike"] = math.nan
        scores["cosmoothing_bits_per_spike"] = math.nan
        scores["rate_rmse_heldout_hz"] = math.nan
        scores["rate_rmse_hz"] = float((sq_train / (R * N)).sqrt())
    return scores, arrays


def split_trials(n_trials: int, fraction: float, seed: int) -> np.ndarray:
    """(n_trials,) bool, True for the held-out trials: ``round(fraction * n_trials)`` of them
    (at least one when fraction > 0, at most all but two), drawn with ``seed``."""
    if fraction <= 0:
        return np.zeros(n_trials, dtype=bool)
    n_out = int(min(max(1, round(fraction * n_trials)), n_trials - 2))
    rng = np.random.default_rng(seed)
    out = np.zeros(n_trials, dtype=bool)
    out[rng.choice(n_trials, size=max(n_out, 0), replace=False)] = True
    return out


def split_neurons(n_neurons: int, fraction: float, seed: int) -> np.ndarray:
    """(n_neurons,) bool, True for the co-smoothing targets (at least one, at most all but
    one, when fraction > 0), drawn with ``seed + 1``."""
    if fraction <= 0 or n_neurons < 2:
        return np.zeros(n_neurons, dtype=bool)
    n_out = int(min(max(1, round(fraction * n_neurons)), n_neurons - 1))
    rng = np.random.default_rng(seed + 1)
    out = np.zeros(n_neurons, dtype=bool)
    out[rng.choice(n_neurons, size=n_out, replace=False)] = True
    return out


def centred_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two (trials, neurons) arrays after removing each neuron's mean over
    trials (the mean modulator is not identifiable apart from d)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a**2).sum() * (b**2).sum())
    return float((a * b).sum() / den) if den > 0 else math.nan


__all__ = [
    "bits_per_spike",
    "centred_correlation",
    "evaluate",
    "gp_conditional",
    "infer_trials",
    "predicted_log_rates",
    "split_neurons",
    "split_trials",
    "trial_mean",
]
