"""The field's baselines for spike counts over trials: each equals a direct computation, the
widths chosen by leave-one-trial-out follow the data, a simulated drift is recovered, and on
the real gpe recording they give the figures measured independently (../shared/notes)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from poplds.nplds.baselines import (
    choose_psth_width,
    cosmoothing_baselines,
    drift_gain,
    heldout_trial_baselines,
    psth,
)

GPE = Path(__file__).resolve().parents[2] / "shared/data/gpe_bandit_units.nwb"


def _counts(R=30, T=40, N=6, seed=0, drift=None):
    """Poisson counts with a smooth time-in-trial rate per neuron and an optional per-trial
    gain (R, N); some bins missing."""
    g = np.random.default_rng(seed)
    t = np.arange(T)
    rate = 0.3 + 0.25 * np.sin(2 * np.pi * (t[:, None] / T + g.random(N)[None]))  # (T, N)
    gain = np.ones((R, N)) if drift is None else drift
    y = g.poisson(rate[None] * gain[:, None, :]).astype(float)
    y[g.random(y.shape) < 0.03] = np.nan
    return y, rate


def _bits_direct(y, rate):
    """NLB bits per spike, written out: Poisson log likelihood against each neuron's mean
    over the observed bins, per spike, in bits."""
    ll = ll0 = spikes = 0.0
    for n in range(y.shape[2]):
        obs = ~np.isnan(y[:, :, n])
        k, lam = y[:, :, n][obs], rate[:, :, n][obs]
        null = max(k.mean(), 1e-12)
        ll += np.sum(k * np.log(lam) - lam)
        ll0 += np.sum(k * math.log(null) - null)
        spikes += k.sum()
    return (ll - ll0) / (spikes * math.log(2))


def test_psth_and_gain_equal_direct_computations():
    y, _ = _counts()
    w = 2.5
    got = psth(y, w)
    T, N = y.shape[1:]
    for n in range(N):
        mean = [np.nanmean(y[:, t, n]) for t in range(T)]
        for t in range(T):
            k = [math.exp(-0.5 * ((t - u) / w) ** 2) for u in range(T)]
            want = sum(a * b for a, b in zip(k, mean, strict=True)) / sum(k)
            assert got[t, n] == pytest.approx(want, rel=1e-12)
    numbers = np.arange(y.shape[0]) * 2 + 5
    at = np.array([4.0, 33.0])
    gain = drift_gain(y, got, numbers, at, 3.0)
    for i, a in enumerate(at):
        for n in range(N):
            num = den = 0.0
            for r in range(y.shape[0]):
                k = math.exp(-0.5 * ((a - numbers[r]) / 3.0) ** 2)
                obs = ~np.isnan(y[r, :, n])
                num += k * y[r, obs, n].sum()
                den += k * got[obs, n].sum()
            assert gain[i, n] == pytest.approx(num / den, rel=1e-12)


def test_scores_equal_the_direct_bits_per_spike():
    y, _ = _counts(seed=1)
    test = np.zeros(y.shape[0], dtype=bool)
    test[::5] = True
    out = heldout_trial_baselines(y, test)
    held = y[test]
    for b in out.values():
        assert b.bits_per_spike == pytest.approx(_bits_direct(held, b.rate), rel=1e-9)
    lam = np.nanmean(y[~test].reshape(-1, y.shape[2]), axis=0)
    np.testing.assert_allclose(out["constant"].rate[0, 0], lam)
    targets = np.array([True, False, False, True, False, False])
    co = cosmoothing_baselines(y, test, targets)["psth_train"]
    assert co.bits_per_spike == pytest.approx(_bits_direct(held[:, :, targets], co.rate))


def test_widths_follow_the_data():
    """A smooth time-in-trial rate gets a smoothing width, and the smoothed PSTH is nearer
    the truth than the raw mean; counts with no time structure get the widest width."""
    y, rate = _counts(R=25, T=60, seed=2)
    w = choose_psth_width(y)
    assert w > 0
    assert np.abs(psth(y, w) - rate).mean() < np.abs(psth(y, 0.0) - rate).mean()
    flat = np.random.default_rng(3).poisson(0.4, size=(25, 60, 4)).astype(float)
    assert choose_psth_width(flat) == max(choose_psth_width.__defaults__[0])


def test_a_slow_drift_is_recovered_and_beats_the_psth():
    R, N = 60, 5
    trials = np.arange(R)
    drift = np.exp(0.6 * np.sin(2 * np.pi * trials / 40))[:, None] * np.ones((1, N))
    y, rate = _counts(R=R, N=N, seed=4, drift=drift)
    test = np.zeros(R, dtype=bool)
    test[np.random.default_rng(5).choice(R, 12, replace=False)] = True
    out = heldout_trial_baselines(y, test, trials)
    assert out["psth_drift"].bits_per_spike > out["psth"].bits_per_spike + 0.02
    assert 2 <= out["psth_drift"].widths["drift_trials"] <= 16
    got = out["psth_drift"].rate.sum(1) / out["psth"].rate.sum(1)  # the gain (R_test, N)
    assert np.corrcoef(got.ravel(), drift[test].ravel())[0, 1] > 0.9


@pytest.mark.skipif(not GPE.exists(), reason="../shared/data is not beside the checkout")
def test_gpe_figures_of_the_notes():
    """On the gpe recording with the README's settings (20 ms bins, trials, window [0, 1])
    and the workflow's split (seed 0), the figures of ../shared/notes/baselines.md, measured
    with other code (its PSTH edges and width grid differ slightly): within 0.003 bits/spike."""
    from poplds.nplds.evaluate import split_neurons, split_trials
    from poplds.sources import RecordingSpec, open_recording
    from poplds.sources._base import TrialOptions

    rec = open_recording(
        RecordingSpec(path=GPE), bin_size_s=0.02, trials=TrialOptions(window=(0.0, 1.0))
    )
    y = np.asarray(rec.activity.compute(), dtype=np.float64)
    numbers = np.asarray(rec.trial_ids)
    rec.close()
    test = split_trials(y.shape[0], 0.2, 0)
    assert np.flatnonzero(test).tolist() == [0, 1, 3, 8, 11, 13, 21, 26, 34, 40]
    out = heldout_trial_baselines(y, test, numbers)
    co = cosmoothing_baselines(y, test, split_neurons(y.shape[2], 0.2, 0))
    notes = {"constant": -0.019, "psth": 0.040, "psth_drift": 0.083}
    for name, value in notes.items():
        assert out[name].bits_per_spike == pytest.approx(value, abs=0.003), name
    assert co["psth_train"].bits_per_spike == pytest.approx(0.041, abs=0.003)
    assert out["psth_drift"].widths["drift_trials"] == 8.0
    # GPFA (elephant) on the same split: the notes' figures at k = 1 and 2 (-0.012, 0.015)
    from poplds.nplds.baselines import gpfa_cosmoothing

    held = split_neurons(y.shape[2], 0.2, 0)
    for k, value in ((1, -0.012), (2, 0.015)):
        b = gpfa_cosmoothing(y, test, held, k, 0.02)
        assert b.bits_per_spike == pytest.approx(value, abs=0.003), k
        assert gpfa_cosmoothing(y, test, held, k, 0.02).bits_per_spike == b.bits_per_spike


def test_report_puts_baselines_beside_the_models():
    """The scores table has one row per baseline; the summary says whether any model beats
    the best baseline, per score."""
    from poplds.report import nplds_rows
    from poplds.summary import _nplds_section

    m = {
        "settings": {"latent_dim": 2},
        "models": {
            "plds": {"heldout_trial_bits_per_spike": 0.02, "cosmoothing_bits_per_spike": 0.05},
            "nplds": {"heldout_trial_bits_per_spike": 0.03, "cosmoothing_bits_per_spike": 0.01},
        },
        "baselines": {
            "psth": {"heldout_trial_bits_per_spike": 0.04, "widths": {"psth_bins": 4.0}},
            "psth_train": {"cosmoothing_bits_per_spike": 0.041, "widths": {}},
        },
    }
    rows = nplds_rows([m])
    assert [r["model"] for r in rows[:2]] == ["baseline: psth", "baseline: psth_train"]
    assert rows[0]["held-out trials bits/spike"] == 0.04
    page = _nplds_section({"chosen": 2}, [m])
    assert "held-out trials: <b>no model beats the best baseline</b>, psth" in page
    assert "co-smoothing: plds (0.05) beats the best baseline, psth_train" in page


def test_nlb_smoothing_glm_equals_a_direct_computation():
    """One kernel sd and ridge: the held-in spikes convolved (zero padded) per trial, log(x +
    1e-4), a Poisson GLM per held-out neuron, against numpy's convolution and scikit-learn
    fitted here."""
    from sklearn.linear_model import PoissonRegressor

    from poplds.nplds.baselines import nlb_smoothing_glm

    rng = np.random.default_rng(4)
    R, T, N = 12, 25, 6
    x = np.cumsum(rng.normal(0, 0.3, (R, T, 1)), 1)
    y = rng.poisson(np.exp(-1.0 + x * rng.normal(1, 0.3, N))).astype(float)
    test = np.zeros(R, bool)
    test[[2, 7, 9]] = True
    targets = np.zeros(N, bool)
    targets[[1, 4]] = True
    b = nlb_smoothing_glm(y, test, targets, 0.02, sds_s=(0.06,), alphas=(0.5,))
    assert b.widths == {"smoothing_sd_s": 0.06, "ridge": 0.5}
    w = 3.0  # 60 ms in 20 ms bins
    taps = np.arange(-4 * 3 - T, T + 4 * 3)
    kern = np.exp(-0.5 * (taps / w) ** 2)
    kern /= kern.sum()
    centre = len(taps) // 2
    feats = np.empty((R, T, N - 2))
    for r in range(R):
        for c, i in enumerate(np.where(~targets)[0]):
            full = np.convolve(y[r, :, i], kern)  # zero padded
            feats[r, :, c] = np.log(full[centre : centre + T] + 1e-4)
    for c, j in enumerate(np.where(targets)[0]):
        m = PoissonRegressor(alpha=0.5, max_iter=300).fit(
            feats[~test].reshape(-1, N - 2), y[~test, :, j].ravel()
        )
        expect = m.predict(feats[test].reshape(-1, N - 2)).reshape(3, T)
        np.testing.assert_allclose(b.rate[:, :, c], expect, rtol=1e-6)
