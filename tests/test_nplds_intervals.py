"""Paired bootstrap of bits/spike: the resampled score equals the score of the resampled data,
and pairing narrows the interval of a difference."""

from __future__ import annotations

import numpy as np
import torch

from poplds.nplds.evaluate import bits_per_spike
from poplds.nplds.intervals import bits_from_sums, draws, paired_intervals, trial_sums


def data(seed=0, R=12, T=15, N=7):
    rng = np.random.default_rng(seed)
    rate = np.exp(rng.normal(-1.5, 0.6, (R, T, N)))
    y = rng.poisson(rate).astype(float)
    y[0, -3:] = np.nan  # missing bins
    return y, np.log(rate), np.log(rate * np.exp(rng.normal(0, 0.3, rate.shape)))


def test_point_and_resampled_scores_equal_the_score_of_the_data():
    y, lr, _ = data()
    s = trial_sums(y, lr)
    assert abs(s.score() - bits_per_spike(torch.tensor(y), torch.tensor(lr))) < 1e-12
    # a resample scores as the explicitly replicated trials and neurons do
    a, b = draws(y.shape[0], y.shape[2], seed=3, n_draws=3)
    got = bits_from_sums(s.Y, s.Nb, s.L, a, b)
    for d in range(3):
        rows = np.repeat(np.arange(y.shape[0]), a[d].astype(int))
        cols = np.repeat(np.arange(y.shape[2]), b[d].astype(int))
        # the null is each neuron's own mean, so a neuron drawn twice counts twice
        yy, ll = y[rows][:, :, cols], lr[rows][:, :, cols]
        expect = bits_per_spike(torch.tensor(yy), torch.tensor(ll))
        assert abs(got[d] - expect) < 1e-10


def test_paired_difference_is_tighter_than_either_score():
    y, good, noisy = data(1, R=30)
    out = paired_intervals(
        {"good": trial_sums(y, good), "noisy": trial_sums(y, noisy)}, [("good", "noisy")], seed=0
    )
    for name in ("good", "noisy"):
        e = out[name]
        assert e["lo"] < e["estimate"] < e["hi"]
    diff = out["good - noisy"]
    assert diff["estimate"] > 0 and diff["lo"] > 0  # the true rates win, clearly
    assert diff["se"] < min(out["good"]["se"], out["noisy"]["se"])
    again = paired_intervals({"good": trial_sums(y, good)}, seed=0)
    assert again["good"] == out["good"]  # seeded
