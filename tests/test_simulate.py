"""The simulated ground truth has the properties the models will be scored against."""

from __future__ import annotations

import numpy as np
import pytest

from poplds import simulate
from poplds.simulate import SimRecording


def test_stitched_parameters():
    p = simulate.random_stitched_lds(30, 6, eig_moduli=(0.9, 0.95), noise_to_signal=0.5, seed=3)
    ev = np.linalg.eigvals(p.A)
    assert np.all((np.abs(ev) >= 0.9 - 1e-12) & (np.abs(ev) <= 0.95 + 1e-12))
    assert np.sum(np.abs(ev.imag) > 1e-9) == 6  # three complex-conjugate pairs
    np.testing.assert_allclose(p.A @ p.Pi @ p.A.T + p.Q, p.Pi, atol=1e-10)
    assert np.trace(p.Pi) / 6 == pytest.approx(1.0)
    np.testing.assert_allclose(p.R, 0.5 * np.einsum("ik,kl,il->i", p.C, p.Pi, p.C))


def test_stitched_simulation_is_seeded():
    layout = simulate.overlapping_layout(20, 2, 4, 50)
    p = simulate.random_stitched_lds(20, 2, seed=1)
    a, xa = simulate.simulate_stitched(p, layout, seed=1)
    b, xb = simulate.simulate_stitched(p, layout, seed=1)
    c, _ = simulate.simulate_stitched(p, layout, seed=2)
    np.testing.assert_array_equal(xa, xb)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.allclose(a[0], c[0])


def test_overlapping_layout():
    layout = simulate.overlapping_layout(100, 3, 10, 7)
    assert [r.neurons for r in layout] == [(0, 40), (30, 70), (60, 100)]
    assert all(r.n_time == 7 for r in layout)


def test_simulated_lagged_covariances_match_the_model():
    """Empirical cov(y[t+s], y[t]) of a long recording equals C A^s Pi C' + [s=0] R."""
    p = simulate.random_stitched_lds(6, 2, eig_moduli=(0.8, 0.9), seed=4)
    (y,), _ = simulate.simulate_stitched(p, [SimRecording("r", (0, 6), 200_000)], seed=4)
    y = y - y.mean(0)
    for s in (0, 1, 3):
        emp = y[s:].T @ y[: len(y) - s] / (len(y) - s)
        model = p.C @ np.linalg.matrix_power(p.A, s) @ p.Pi @ p.C.T + (s == 0) * np.diag(p.R)
        scale = np.abs(model).max()
        assert np.abs(emp - model).max() < 0.08 * scale, s


def test_written_stitched_dataset(tmp_path):
    paths = simulate.write_stitched_simulation(
        tmp_path,
        n_neurons=12,
        latent_dim=2,
        recordings=[
            {"name": "a", "neurons": [0, 8], "n_time": 30},
            {"name": "b", "neurons": [5, 12], "n_time": 40},
        ],
        seed=5,
    )
    a = np.load(paths[0])
    truth = np.load(tmp_path / "truth.npz")
    assert a["activity"].shape == (30, 8) and a["activity"].dtype == np.float32
    assert a["neuron_ids"].tolist() == [f"n{i}" for i in range(8)]
    assert truth["x"].shape == (70, 2) and truth["C"].shape == (12, 2)
    assert {"A", "C", "Q", "R", "Pi"} <= set(truth.files)


def test_gp_drift_covariance():
    rng = np.random.default_rng(0)
    n = np.array([0.0, 3.0, 10.0, 40.0])
    h = simulate.gp_sample(n, sigma2=2.0, tau=5.0, n_dims=40_000, rng=rng)
    emp = h @ h.T / h.shape[1]
    K = 2.0 * np.exp(-0.5 * ((n[:, None] - n[None, :]) / 5.0) ** 2)
    np.testing.assert_allclose(emp, K, atol=0.06)


def test_poisson_trials_truth(tmp_path):
    kw = {
        "n_neurons": 10,
        "latent_dim": 3,
        "n_trials": 80,
        "n_bins": 50,
        "drift_dims": 1,
        "opposite_groups": True,
        "seed": 7,
    }
    t = simulate.simulate_poisson_trials(**kw)
    assert t.counts.shape == (80, 50, 10) and t.counts.min() >= 0
    assert np.all(t.h[:, 1:] == 0) and t.h[:, 0].std() > 0.1
    assert np.all(t.C[:5, 0] > 0) and np.all(t.C[5:, 0] < 0)
    rate = np.exp((t.x + t.h[:, None, :]) @ t.C.T + t.d)
    # the counts are Poisson draws around the rates: means agree within sampling error
    assert abs(t.counts.mean() - rate.mean()) < 4 * np.sqrt(rate.mean() / t.counts.size)
    paths = simulate.write_poisson_trial_simulation(tmp_path, **kw)
    z = np.load(paths[0])
    np.testing.assert_array_equal(z["activity"], t.counts)  # same seed, same data
    assert float(z["rate_hz"]) == 50.0
    truth = np.load(tmp_path / "truth.npz")
    np.testing.assert_allclose(truth["log_rate_shift"], t.h @ t.C.T)
