"""Paired bootstrap intervals for bits-per-spike scores over held-out trials and neurons.

A score (:func:`.evaluate.bits_per_spike`) is a ratio of sums over the evaluated trials r and
neurons i. With per-(trial, neuron) sums over bins (observed bins only)::

    Y[r,i] = sum_t y,   Nb[r,i] = number of observed bins,   L[r,i] = sum_t (y log rate - rate)

a resample that takes trial r ``a_r`` times and neuron i ``b_i`` times has::

    Y_i = sum_r a_r Y[r,i],  O_i = sum_r a_r Nb[r,i],  L_i = sum_r a_r L[r,i],
    null_i = Y_i / Nb_i,      LL0_i = Y_i log null_i - Nb_i null_i,
    bits = sum_i b_i (L_i - LL0_i) / (ln 2 sum_i b_i Y_i)

exactly the score of the resampled data (the null, each neuron's mean rate over the evaluated
bins, is recomputed per resample as the score defines it). Every model and baseline scored on
the same trials and neurons is resampled with the same draws (paired), so the interval of a
difference of two scores comes from the differences per draw. Trials and neurons are drawn
independently (a two-way bootstrap: both are samples from larger populations). Percentile
intervals; the draws are seeded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: Bootstrap draws per interval.
N_DRAWS = 2000


@dataclass(frozen=True)
class TrialSums:
    """Per-(trial, neuron) sums over observed bins (module docstring): Y, Nb (R, N) shared by
    every prediction of the same data, and L (R, N) of one prediction."""

    Y: np.ndarray
    Nb: np.ndarray
    L: np.ndarray

    def score(self) -> float:
        """The bits/spike of the data as they are (every weight one)."""
        R, N = self.Y.shape
        return float(bits_from_sums(self.Y, self.Nb, self.L, np.ones((1, R)), np.ones((1, N)))[0])


def trial_sums(y: np.ndarray, log_rate: np.ndarray) -> TrialSums:
    """:class:`TrialSums` of counts y (R, T, N) (NaN: missing) under log rates (R, T, N)."""
    y = np.asarray(y, dtype=np.float64)
    lr = np.asarray(log_rate, dtype=np.float64)
    o = ~np.isnan(y)
    y0 = np.where(o, y, 0.0)
    ll = np.where(o, y0 * lr - np.exp(lr), 0.0)
    return TrialSums(y0.sum(1), o.sum(1).astype(np.float64), ll.sum(1))


def bits_from_sums(
    Y: np.ndarray,
    Nb: np.ndarray,
    L: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,  # noqa: E741
) -> np.ndarray:
    """(D,) bits/spike of D resamples: trial weights a (D, R), neuron weights b (D, N)
    (module docstring; all ones gives the score itself)."""
    Yi, Oi, Li = a @ Y, a @ Nb, a @ L
    null = np.where(Oi > 0, Yi / np.maximum(Oi, 1e-300), 0.0)
    safe = np.maximum(null, 1e-300)
    ll0 = np.where(Yi > 0, Yi * np.log(safe), 0.0) - Oi * null
    spikes = (b * Yi).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (b * (Li - ll0)).sum(-1) / (spikes * math.log(2))


def draws(
    n_trials: int, n_neurons: int, seed: int, n_draws: int = N_DRAWS, neurons: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded multiplicities of trials (D, R) and neurons (D, N) (all ones when ``neurons``
    is False)."""
    rng = np.random.default_rng([seed, n_trials, n_neurons])
    a = rng.multinomial(n_trials, np.full(n_trials, 1.0 / n_trials), size=n_draws)
    if neurons and n_neurons > 1:
        b = rng.multinomial(n_neurons, np.full(n_neurons, 1.0 / n_neurons), size=n_draws)
    else:
        b = np.ones((n_draws, n_neurons))
    return a.astype(np.float64), b.astype(np.float64)


def _summary(point: float, values: np.ndarray, level: float) -> dict[str, float]:
    v = values[np.isfinite(values)]
    if v.size < 10:
        return {"estimate": point, "lo": math.nan, "hi": math.nan, "se": math.nan}
    q = (1 - level) / 2
    return {
        "estimate": point,
        "lo": float(np.quantile(v, q)),
        "hi": float(np.quantile(v, 1 - q)),
        "se": float(v.std(ddof=1)),
    }


def paired_intervals(
    sums: Mapping[str, TrialSums],
    differences: Sequence[tuple[str, str]] = (),
    seed: int = 0,
    level: float = 0.95,
    n_draws: int = N_DRAWS,
    neurons: bool = True,
    keep_draws: Sequence[str] = (),
) -> dict[str, dict[str, float]]:
    """Percentile intervals (``estimate``, ``lo``, ``hi``, ``se``) of the bits/spike of every
    prediction in ``sums`` (all of the same trials and neurons) and of each difference
    ``(a, b)`` (key ``"a - b"``), from the same seeded draws (module docstring). Entries
    named in ``keep_draws`` also hold their per-draw scores (``draws``, 6 decimals), so that
    scores of the same split from other runs (another k) can be compared draw by draw."""
    first = next(iter(sums.values()))
    R, N = first.Y.shape
    a, b = draws(R, N, seed, n_draws, neurons)
    values, out = {}, {}
    for name, s in sums.items():
        values[name] = bits_from_sums(s.Y, s.Nb, s.L, a, b)
        out[name] = _summary(s.score(), values[name], level)
        if name in keep_draws:
            out[name]["draws"] = np.round(values[name], 6).tolist()
    for x, y in differences:
        if x in values and y in values:
            out[f"{x} - {y}"] = _summary(
                out[x]["estimate"] - out[y]["estimate"], values[x] - values[y], level
            )
    return out
