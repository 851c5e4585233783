"""The field's baselines for spike counts over trials, on the models' own split, scored as the
models are (:func:`.evaluate.bits_per_spike`).

Counts ``y`` are (R, T, N): trials, time bins, neurons; NaN marks a missing bin. ``test``
(R,) marks the held-out trials; ``trial_numbers`` (R,) place the trials in the session.

Held-out trials (rates predicted before seeing the trial), from the training trials only:

- ``constant``: each neuron's mean count per bin, ``lambda_n``.
- ``psth``: the mean count per time bin, smoothed over bins by a Gaussian of sd ``w`` bins
  (weights renormalised at the trial's edges; ``w = 0``: none), ``w`` chosen by
  leave-one-trial-out Poisson likelihood over :data:`PSTH_WIDTHS`::

      psth_n(t) = sum_t' k_w(t, t') ybar_n(t') / sum_t' k_w(t, t'),  ybar_n(t) = mean_r y_rtn

- ``psth_drift``: ``psth_n(t) g_n(r)``, a per-neuron gain that drifts over trial number: the
  ratio of observed to PSTH-expected counts, Gaussian-smoothed over trial numbers (sd ``v``
  trials, by leave-one-trial-out over :data:`DRIFT_WIDTHS`)::

      g_n(r) = sum_j k_v(r, j) Y_jn / sum_j k_v(r, j) E_jn,   Y_jn = sum_t y_jtn,
      E_jn = sum_t psth_n(t)   (over the observed bins of training trial j)

Co-smoothing (held-out neurons of held-out trials from held-in ones):

- ``psth_train``: the held-out neurons' training PSTH (``psth`` above, its width chosen on
  every neuron), using no held-in data.
- ``nlb_glm``: the Neural Latents Benchmark's smoothing baseline: each trial's held-in spikes
  convolved with a Gaussian (zero padded at the trial's edges; missing bins count as 0), the
  features ``log(smoothed + 1e-4)``, and one Poisson GLM with intercept per held-out neuron
  (scikit-learn's ``PoissonRegressor``), its ridge and the kernel's sd chosen together by
  3-fold cross-validation over training trials (:data:`NLB_SDS_S`, :data:`NLB_ALPHAS`).
- ``gpfa_k<k>``: GPFA (Yu et al. 2009, elephant's implementation) with k latents fitted on the
  square-root counts of the training trials, every neuron; a held-out trial's latents are
  inferred from its held-in neurons' rows (exact GP posterior), and a held-out neuron's
  predicted count is the mean of the square, ``(c'm + d)^2 + c'Vc + R_ii``. Trials are cut
  before their first missing bin; elephant's random segmenting of trials is seeded.

Rates are floored at :data:`RATE_FLOOR` counts per bin (a log of zero scores minus infinity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .evaluate import bits_per_spike

#: Candidate PSTH smoothing widths (sd, in bins).
PSTH_WIDTHS = tuple(np.arange(0.0, 6.01, 0.5))

#: Candidate drift smoothing widths (sd, in trials).
DRIFT_WIDTHS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)

#: Kernel sds (seconds) and ridge penalties tried by the NLB smoothing baseline.
NLB_SDS_S = (0.04, 0.06)
NLB_ALPHAS = (0.1, 1.0, 10.0)

#: The lowest rate (counts per bin) a baseline predicts.
RATE_FLOOR = 1e-6


@dataclass
class Baseline:
    """One baseline's predicted rates (R_test, T, N) for the trials it was asked about, its
    score in bits per spike, and the smoothing widths it chose (sd, bins or trials)."""

    rate: np.ndarray
    bits_per_spike: float
    widths: dict[str, float]

    @property
    def log_rate(self) -> np.ndarray:
        """The log of the rates, as the score takes them (floored at :data:`RATE_FLOOR`)."""
        return np.log(np.maximum(self.rate, RATE_FLOOR))


def _smooth_matrix(n: int, width: float) -> np.ndarray:
    """(n, n) row-normalised Gaussian smoother of sd ``width`` (identity at 0)."""
    if width <= 0:
        return np.eye(n)
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    k = np.exp(-0.5 * (d / width) ** 2)
    return k / k.sum(1, keepdims=True)


def _mean_counts(y: np.ndarray) -> np.ndarray:
    """(T, N) mean over trials of the observed counts (NaN-aware; 0 where never observed)."""
    seen = ~np.isnan(y)
    total = np.where(seen, y, 0.0).sum(0)
    return np.divide(total, seen.sum(0), out=np.zeros_like(total), where=seen.sum(0) > 0)


def psth(y: np.ndarray, width: float) -> np.ndarray:
    """(T, N): the trials' mean count per bin, smoothed over bins (module docstring)."""
    return np.maximum(_smooth_matrix(y.shape[1], width) @ _mean_counts(y), RATE_FLOOR)


def _poisson_ll(y: np.ndarray, rate: np.ndarray) -> float:
    """Poisson log likelihood (without the ``log y!`` term) over the observed bins."""
    seen = ~np.isnan(y)
    y0 = np.where(seen, y, 0.0)
    return float(np.sum(np.where(seen, y0 * np.log(rate) - rate, 0.0)))


def choose_psth_width(y: np.ndarray, widths: Sequence[float] = PSTH_WIDTHS) -> float:
    """The PSTH width (sd, bins) of the best leave-one-trial-out likelihood on trials ``y``."""
    R = y.shape[0]
    seen = ~np.isnan(y)
    total = np.where(seen, y, 0.0).sum(0)
    count = seen.sum(0)
    best, arg = -np.inf, widths[0]
    for w in widths:
        S = _smooth_matrix(y.shape[1], w)
        ll = 0.0
        for r in range(R):  # the PSTH of the other trials
            c = count - seen[r]
            mean = np.divide(
                total - np.where(seen[r], y[r], 0.0), c, out=np.zeros(c.shape), where=c > 0
            )
            ll += _poisson_ll(y[r], np.maximum(S @ mean, RATE_FLOOR))
        if ll > best:
            best, arg = ll, w
    return float(arg)


def drift_gain(
    y: np.ndarray, rate: np.ndarray, numbers: np.ndarray, at: np.ndarray, width: float
) -> np.ndarray:
    """(len(at), N): the per-neuron gains ``g_n`` at trial numbers ``at`` from trials ``y``
    (R, T, N) at ``numbers`` (R,) and their expected rates ``rate`` (T, N) (module
    docstring)."""
    seen = ~np.isnan(y)
    Y = np.where(seen, y, 0.0).sum(1)  # (R, N)
    E = np.where(seen, rate[None], 0.0).sum(1)
    k = np.exp(-0.5 * ((np.asarray(at)[:, None] - np.asarray(numbers)[None, :]) / width) ** 2)
    return np.divide(k @ Y, k @ E, out=np.ones((len(at), Y.shape[1])), where=(k @ E) > 0)


def choose_drift_width(
    y: np.ndarray, rate: np.ndarray, numbers: np.ndarray, widths: Sequence[float] = DRIFT_WIDTHS
) -> float:
    """The drift width (sd, trials) of the best leave-one-trial-out likelihood."""
    R = y.shape[0]
    best, arg = -np.inf, widths[0]
    for v in widths:
        ll = 0.0
        for r in range(R):
            others = np.arange(R) != r
            g = drift_gain(y[others], rate, numbers[others], numbers[r : r + 1], v)[0]
            ll += _poisson_ll(y[r], np.maximum(rate * g, RATE_FLOOR))
        if ll > best:
            best, arg = ll, v
    return float(arg)


def _score(y: np.ndarray, rate: np.ndarray) -> float:
    return bits_per_spike(torch.as_tensor(y), torch.as_tensor(np.log(np.maximum(rate, RATE_FLOOR))))


def heldout_trial_baselines(
    y: np.ndarray, test: np.ndarray, trial_numbers: np.ndarray | None = None
) -> dict[str, Baseline]:
    """``constant``, ``psth`` and ``psth_drift`` (module docstring) for the held-out trials
    ``test`` (R,) bool of counts ``y`` (R, T, N), each fitted on the other trials."""
    test = np.asarray(test, dtype=bool)
    numbers = np.arange(y.shape[0]) if trial_numbers is None else np.asarray(trial_numbers)
    train, held = y[~test], y[test]
    lam = np.nanmean(train.reshape(-1, y.shape[2]), axis=0)
    constant = np.broadcast_to(np.maximum(np.nan_to_num(lam), RATE_FLOOR), held.shape).copy()
    w = choose_psth_width(train)
    base = psth(train, w)
    v = choose_drift_width(train, base, numbers[~test])
    g = drift_gain(train, base, numbers[~test], numbers[test], v)
    drift = np.maximum(base[None] * g[:, None, :], RATE_FLOOR)
    flat = np.broadcast_to(base, held.shape).copy()
    return {
        "constant": Baseline(constant, _score(held, constant), {}),
        "psth": Baseline(flat, _score(held, flat), {"psth_bins": w}),
        "psth_drift": Baseline(drift, _score(held, drift), {"psth_bins": w, "drift_trials": v}),
    }


def cosmoothing_baselines(
    y: np.ndarray, test: np.ndarray, targets: np.ndarray
) -> dict[str, Baseline]:
    """``psth_train`` (module docstring): the held-out neurons ``targets`` (N,) bool of the
    held-out trials ``test`` (R,) bool, from their training PSTH."""
    test, targets = np.asarray(test, dtype=bool), np.asarray(targets, dtype=bool)
    w = choose_psth_width(y[~test])  # as the held-out-trial PSTH: chosen on every neuron
    held = y[test][:, :, targets]
    rate = np.broadcast_to(psth(y[~test][:, :, targets], w), held.shape).copy()
    return {"psth_train": Baseline(rate, _score(held, rate), {"psth_bins": w})}


def gpfa_cosmoothing(
    y: np.ndarray,
    test: np.ndarray,
    targets: np.ndarray,
    k: int,
    bin_s: float,
    seed: int = 0,
    max_iters: int = 500,
) -> Baseline:
    """``gpfa_k<k>`` (module docstring) for the held-out neurons ``targets`` (N,) bool of the
    held-out trials ``test`` (R,) bool of counts y (R, T, N). Needs elephant (and
    scikit-learn, which it uses to start); predicted rates (R_test, T, N_targets), NaN past a
    trial's first missing bin (those bins are missing in y too)."""
    import contextlib
    import io
    import warnings

    from elephant.gpfa import gpfa_core

    test, targets = np.asarray(test, dtype=bool), np.asarray(targets, dtype=bool)
    root = np.sqrt(y)

    def seqs(trials: np.ndarray, neurons: np.ndarray) -> np.ndarray:
        out = np.empty(len(trials), dtype=[("T", int), ("y", object)])
        for j, r in enumerate(trials):
            seen = ~np.isnan(y[r]).any(1)
            T_r = int(np.argmin(seen)) if not seen.all() else len(seen)
            out[j]["T"] = T_r
            out[j]["y"] = root[r, :T_r][:, neurons].T
        return out

    all_neurons = np.ones(y.shape[2], dtype=bool)
    state = np.random.get_state()  # noqa: NPY002  (elephant cuts trials with it)
    try:
        np.random.seed(seed)  # noqa: NPY002
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, _ = gpfa_core.fit(
                seqs(np.where(~test)[0], all_neurons),
                x_dim=k,
                bin_width=1000.0 * bin_s,
                em_max_iters=max_iters,
            )
            held_in = ~targets
            sub = dict(params)
            sub["C"], sub["d"] = params["C"][held_in], params["d"][held_in]
            sub["R"] = params["R"][np.ix_(held_in, held_in)]
            inferred, _ = gpfa_core.exact_inference_with_ll(
                seqs(np.where(test)[0], held_in), sub, get_ll=False
            )
    finally:
        np.random.set_state(state)  # noqa: NPY002
    C, d = params["C"][targets], params["d"][targets]
    noise = np.diag(params["R"])[targets]
    held = y[test][:, :, targets]
    rate = np.full(held.shape, np.nan)
    for j, trial in enumerate(inferred):
        m, V = trial["latent_variable"], trial["Vsm"]  # (k, T_r), (k, k, T_r)
        mean = (C @ m).T + d
        var = np.einsum("ik,klt,il->ti", C, V, C) + noise
        rate[j, : m.shape[1]] = np.maximum(mean**2 + var, RATE_FLOOR)
    observed = ~np.isnan(held)
    score_rate = np.where(np.isnan(rate), 1.0, rate)  # only where y is missing
    if np.any(np.isnan(rate) & observed):
        raise ValueError("GPFA left observed bins without a prediction")
    return Baseline(
        score_rate,
        _score(held, score_rate),
        {"latent_dim": float(k), "em_iterations": float(max_iters)},
    )


def _zero_padded_smoother(n: int, width: float) -> np.ndarray:
    """(n, n) Gaussian convolution of sd ``width`` bins with zero padding (rows not renormalised
    at the edges, as the NLB's smoothing)."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    k = np.exp(-0.5 * (d / width) ** 2)
    return (
        k
        / np.exp(
            -0.5
            * (np.arange(-4 * int(np.ceil(width)) - n, n + 4 * int(np.ceil(width))) / width) ** 2
        ).sum()
    )


def nlb_smoothing_glm(
    y: np.ndarray,
    test: np.ndarray,
    targets: np.ndarray,
    bin_s: float,
    sds_s: Sequence[float] = NLB_SDS_S,
    alphas: Sequence[float] = NLB_ALPHAS,
    folds: int = 3,
    seed: int = 0,
) -> Baseline:
    """``nlb_glm`` (module docstring) for the held-out neurons ``targets`` (N,) bool of the
    held-out trials ``test`` (R,) bool of counts y (R, T, N)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import PoissonRegressor

    test, targets = np.asarray(test, dtype=bool), np.asarray(targets, dtype=bool)
    R, T, _ = y.shape
    train = np.where(~test)[0]
    fold = np.random.default_rng(seed).permutation(len(train)) % folds  # trials, not bins

    def features(sd_s: float) -> np.ndarray:
        S = _zero_padded_smoother(T, sd_s / bin_s)
        held_in = np.nan_to_num(y[:, :, ~targets])
        return np.log(np.einsum("ts,rsn->rtn", S, held_in) + 1e-4)  # (R, T, N_in)

    def glm(X, t, alpha):
        model = PoissonRegressor(alpha=alpha, max_iter=300)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return model.fit(X, t)

    best = (-np.inf, None, None)
    feats = {sd: features(sd) for sd in sds_s}
    for sd, X in feats.items():
        for alpha in alphas:
            ll = 0.0
            for f in range(folds):
                fit_r, val_r = train[fold != f], train[fold == f]
                for j in np.where(targets)[0]:
                    t_fit, t_val = y[fit_r, :, j].ravel(), y[val_r, :, j].ravel()
                    ok_fit, ok_val = ~np.isnan(t_fit), ~np.isnan(t_val)
                    m = glm(X[fit_r].reshape(-1, X.shape[2])[ok_fit], t_fit[ok_fit], alpha)
                    rate = np.maximum(
                        m.predict(X[val_r].reshape(-1, X.shape[2])[ok_val]), RATE_FLOOR
                    )
                    ll += float((t_val[ok_val] * np.log(rate) - rate).sum())
            if ll > best[0]:
                best = (ll, sd, alpha)
    _, sd, alpha = best
    X = feats[sd]
    held = y[test][:, :, targets]
    rate = np.empty(held.shape)
    for c, j in enumerate(np.where(targets)[0]):
        t_fit = y[train, :, j].ravel()
        ok = ~np.isnan(t_fit)
        m = glm(X[train].reshape(-1, X.shape[2])[ok], t_fit[ok], alpha)
        pred = m.predict(X[test].reshape(-1, X.shape[2])).reshape(len(np.where(test)[0]), T)
        rate[:, :, c] = np.maximum(pred, RATE_FLOOR)
    return Baseline(rate, _score(held, rate), {"smoothing_sd_s": float(sd), "ridge": float(alpha)})
