"""Stitched LDS fitting: recovery of a simulated truth, the held-out split, streaming, seeds,
identifiability, bad input, and the CUDA path."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import simulated

from poplds import DatasetStore, InputError, ingest_dataset, simulate, stitched
from poplds.stitched import (
    RecordingInput,
    StitchedOutputs,
    StitchedSettings,
    fit_store,
    prepare_data,
)
from poplds.stitched.evaluate import (
    covariance_scores,
    identifiability,
    principal_angles_deg,
    symmetry_dimension,
)
from poplds.stitched.models import dynamics_from_lagged

CPU = torch.device("cpu")


def truth_params(p, lags):
    from poplds.stitched import StitchedLDSParams

    return StitchedLDSParams.from_dynamics(p.A, p.C, p.Q, p.R, p.Pi, lags)


@pytest.fixture(scope="module")
def recovered():
    p, recs = simulated()
    fit = stitched.fit(
        recs, 60, 3, StitchedSettings(lags=6, device="cpu", heldout_fraction=0.1, seed=0)
    )
    return p, recs, fit


def test_recovers_never_coobserved_covariances(recovered):
    p, _, fit = recovered
    scores = covariance_scores(fit.params, fit.data, truth=truth_params(p, 6))
    never = [row["corr"] for row in scores["never_vs_truth"]]
    assert min(never) > 0.95, never
    assert all(row["n_pairs"] > 500 for row in scores["never_vs_truth"])
    assert max(principal_angles_deg(p.C, fit.params.C)) < 10
    true_mod = np.sort(np.abs(np.linalg.eigvals(p.A)))
    fit_mod = np.sort(np.abs(np.linalg.eigvals(fit.params.A)))
    np.testing.assert_allclose(fit_mod, true_mod, atol=0.03)
    # R recovers the per-neuron noise (noise equals signal here)
    assert np.corrcoef(fit.params.R, p.R)[0, 1] > 0.9
    # Q = Pi - A Pi A' is PSD and A is stable
    assert np.linalg.eigvalsh(fit.params.Q).min() >= -1e-12
    assert np.abs(np.linalg.eigvals(fit.params.A)).max() < 1


def test_heldout_pairs_are_predicted_as_well_as_fitted_ones(recovered):
    _, _, fit = recovered
    scores = covariance_scores(fit.params, fit.data)
    for obs, held in zip(scores["observed"], scores["heldout"], strict=True):
        assert held["n_pairs"] > 50
        assert held["corr"] > 0.9 and held["corr"] > obs["corr"] - 0.05


def test_fit_converges_and_loss_falls(recovered):
    _, _, fit = recovered
    assert fit.info.free.converged and fit.info.linked.converged
    losses = [v for stage, _, v in fit.trace if stage == "free"]
    assert losses[-1] < losses[0]


def test_warm_start_never_sees_heldout_pairs():
    """The start's PCA is that of the covariance with the held-out pairs' entries zeroed, so
    a held-out score never rests on the pairs it scores, however early a fit stops; from the
    data, the projections its last pass keeps are those a pass with its loadings forms."""
    from poplds.stitched._loss import DataTerm
    from poplds.stitched._warm import _project_groups, _top_subspace

    _, recs = simulated(N=40, n_rec=1, T=3000)
    data = prepare_data(recs, 40, lags=3, device=CPU, heldout_fraction=0.3, seed=1)
    rec = data.recordings[0]
    y = rec.data.numpy().astype(np.float64)
    cov = y.T @ y / rec.n_time
    g = data.group_of[rec.neurons]
    masked = np.where(data.heldout[g[:, None], g[None, :]], 0.0, cov)
    assert (masked != cov).mean() > 0.1  # the split holds pairs out of this recording
    term = DataTerm(data, data.weights(CPU), 3, route="moments")
    w, U = np.linalg.eigh(masked)
    for moments in (None, term.masked_moments(0)):  # from the data, from the moments
        V, lam, proj = _top_subspace(data, 0, 3, seed=0, moments=moments, iters=60)
        np.testing.assert_allclose(lam.numpy(), w[::-1][:3], rtol=1e-5)
        if moments is None:
            z = _project_groups(rec, V, CPU)
            np.testing.assert_allclose(proj.numpy(), z.numpy(), rtol=0, atol=1e-5 * z.abs().max())
        else:
            assert proj is None
        # same subspace as the masked covariance's top eigenvectors
        angles = principal_angles_deg(U[:, ::-1][:, :3], V.numpy())
        assert max(angles) < 0.1, angles


def test_convergence_test_does_not_depend_on_the_data_units():
    """The stop rests on the loss's own sampling noise: data in other units (here 1e-3 times)
    give the same passes and the same fit up to the units."""
    _, recs = simulated(N=40, T=3000)
    small = [RecordingInput(r.name, r.activity * 1e-3, r.neurons) for r in recs]
    a = stitched.fit(recs, 40, 3, StitchedSettings(lags=5, device="cpu", heldout_fraction=0.1))
    b = stitched.fit(small, 40, 3, StitchedSettings(lags=5, device="cpu", heldout_fraction=0.1))
    for stage in ("free", "linked"):
        assert getattr(a.info, stage).stop != "max_passes"
        assert abs(getattr(a.info, stage).passes - getattr(b.info, stage).passes) <= 2
    pa = a.params.C @ a.params.Pi @ a.params.C.T
    pb = b.params.C @ b.params.Pi @ b.params.C.T * 1e6
    np.testing.assert_allclose(pb, pa, rtol=1e-3, atol=1e-4 * np.abs(pa).max())


def test_a_fit_at_the_cap_warns():
    _, recs = simulated(N=40, T=2000)
    fit = stitched.fit(recs, 40, 3, StitchedSettings(lags=5, device="cpu", max_passes=8))
    assert fit.info.stop == "max_passes"
    assert fit.info.free.stop == "max_passes" and fit.info.free.passes == 8
    assert any("max_passes (8)" in w for w in fit.info.warnings)


@pytest.mark.shared_data
def test_sparse_real_events_fit_moves_and_converges():
    """dentate_gyrus_events.nwb: sparse deconvolved events, whose covariances are tiny
    against their variances. The old test (scaled by the squared mean variance) stopped this
    fit at its warm start after 6 passes; now it converges by its test, having moved."""
    import h5py
    from conftest import SHARED_DATA

    with h5py.File(SHARED_DATA / "dentate_gyrus_events.nwb", "r") as f:
        y = np.asarray(f["processing/ophys/events/data"][:], dtype=np.float32)
    N = y.shape[1]
    fit = stitched.fit(
        [RecordingInput("dg", y, np.arange(N))], N, 4, StitchedSettings(device="cpu")
    )
    assert fit.info.stop == "converged", fit.info
    assert fit.info.free.passes > 20
    assert fit.info.moved_noise_units > 10 * 1e-3
    assert not any("barely moved" in w for w in fit.info.warnings)


def test_heldout_split_holds_out_the_asked_fraction():
    rng = np.random.default_rng(0)
    recs = [RecordingInput("a", rng.standard_normal((50, 3000)), np.arange(3000))]
    data = prepare_data(recs, 3000, lags=2, device=CPU, heldout_fraction=0.2, seed=3)
    sizes = data.group_size.astype(float)
    held = np.einsum("gh,g,h->", data.heldout.astype(float), sizes, sizes)
    assert held / 3000**2 == pytest.approx(0.2, abs=0.02)
    # every neuron keeps pairs in the fit: its own group is never held out
    assert not np.any(np.diagonal(data.heldout))


def test_same_seed_same_fit_and_dynamics_estimate():
    _, recs = simulated(N=30, n=2, T=1500)
    a = stitched.fit(recs, 30, 2, StitchedSettings(lags=4, device="cpu", seed=5))
    b = stitched.fit(recs, 30, 2, StitchedSettings(lags=4, device="cpu", seed=5))
    np.testing.assert_array_equal(a.params.C, b.params.C)
    np.testing.assert_array_equal(a.params.A, b.params.A)
    # A from exact lagged covariances X_s = A^s Pi is A itself
    p = simulate.random_stitched_lds(5, 4, seed=1)
    X = np.stack([np.linalg.matrix_power(p.A, s) @ p.Pi for s in range(4)])
    np.testing.assert_allclose(dynamics_from_lagged(X), p.A, atol=1e-10)


def two_recordings(tmp_path, seed, spans, n_time):
    """npz files of a simulated 30-neuron, 2-latent LDS seen by recordings a and b."""
    return simulate.write_stitched_simulation(
        tmp_path / "sim",
        n_neurons=30,
        latent_dim=2,
        seed=seed,
        recordings=[
            {"name": name, "neurons": list(span), "n_time": t}
            for name, span, t in zip("ab", spans, n_time, strict=True)
        ],
    )


def test_streamed_from_the_store_equals_in_memory(tmp_path):
    paths = two_recordings(tmp_path, 2, [(0, 20), (12, 30)], (1200, 1000))
    store = ingest_dataset([{"path": str(p)} for p in paths], tmp_path / "ds" / "data.zarr")
    s = StitchedSettings(lags=4, device="cpu", max_passes=40, route="data", optimizer="lbfgs")
    mem = fit_store(store, 2, s, outputs=StitchedOutputs.under(tmp_path / "mem", 2))
    streamed = fit_store(
        store,
        2,
        replace(s, max_device_bytes=0),
        outputs=StitchedOutputs.under(tmp_path / "stream", 2),
    )
    fit_s, fit_m = streamed.fits["stitched_lds"], mem.fits["stitched_lds"]
    assert all(r.data is None for r in fit_s.data.recordings)
    assert all(r.data is not None for r in fit_m.data.recordings)
    np.testing.assert_array_equal(fit_s.params.C, fit_m.params.C)
    assert mem.outputs.metrics == tmp_path / "mem" / "stitched_lds" / "n2" / "metrics.json"
    assert mem.outputs.metrics.exists() and mem.outputs.sample.exists()
    # the returned metrics are what metrics.json holds: no private keys
    assert json.loads(mem.outputs.metrics.read_text()).keys() == mem.metrics.keys()
    assert not [k for k in mem.metrics["covariance"] if k.startswith("_")]
    for a, b in zip(streamed.latents, mem.latents, strict=True):
        np.testing.assert_allclose(a.mean.numpy(), b.mean.numpy(), atol=1e-5)


def test_disconnected_recordings_are_reported(caplog):
    _, recs = simulated(N=40, n=2, overlap=0, T=1500)
    fit = stitched.fit(recs, 40, 2, StitchedSettings(lags=4, device="cpu"))
    report = identifiability(fit.params, fit.data)
    assert report["components"] == [["s1"], ["s2"]]
    assert report["sign_ambiguous"] is True
    assert any("disconnected" in w for w in fit.info.warnings)
    # a rotation-scaling A with isotropic Pi leaves a one-dimensional family of rotations;
    # a generic Pi leaves none
    A = 0.9 * np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    assert symmetry_dimension(A, np.eye(2)) == 1
    assert symmetry_dimension(A, np.array([[2.0, 0.3], [0.3, 1.0]])) == 0


def test_bad_input():
    _, recs = simulated(N=20, n=2, T=200)
    with pytest.raises(InputError, match="latent dimension 50 exceeds"):
        stitched.fit(recs, 20, 50, StitchedSettings(lags=4, device="cpu"))
    with pytest.raises(InputError, match="at least 2 lags"):
        stitched.fit(recs, 20, 2, StitchedSettings(lags=1, device="cpu"))
    with pytest.raises(InputError, match="needs more than 300"):
        stitched.fit(recs, 20, 2, StitchedSettings(lags=300, device="cpu"))
    with pytest.raises(InputError, match="at most 0.5"):
        stitched.fit(recs, 20, 2, StitchedSettings(lags=4, device="cpu", heldout_fraction=0.8))


def test_trial_data_is_refused(tmp_path):
    np.savez(
        tmp_path / "t.npz", activity=np.zeros((3, 20, 4)), neuron_ids=np.arange(4), rate_hz=10.0
    )
    store = ingest_dataset(
        [{"path": str(tmp_path / "t.npz")}], tmp_path / "d" / "data.zarr", trials=True
    )
    with pytest.raises(InputError, match="needs continuous"):
        fit_store(store, 2)


@pytest.mark.requires_cuda
def test_cuda_path_matches_cpu():
    _, recs = simulated(N=40, n=2, T=2000)
    cpu = stitched.fit(recs, 40, 2, StitchedSettings(lags=4, device="cpu", max_passes=60))
    gpu = stitched.fit(recs, 40, 2, StitchedSettings(lags=4, device="cuda", max_passes=60))
    assert gpu.info.device.startswith("cuda")
    pred_c = cpu.params.C @ cpu.params.Pi @ cpu.params.C.T
    pred_g = gpu.params.C @ gpu.params.Pi @ gpu.params.C.T
    np.testing.assert_allclose(pred_g, pred_c, rtol=1e-3, atol=1e-3 * np.abs(pred_c).max())


def test_choose_dimension_prefers_the_smallest_near_best():
    from poplds.stitched.plots import choose_dimension

    assert choose_dimension([2, 4, 6], [0.34, 0.0656, 0.0683]) == 4
    assert choose_dimension([2, 4, 8], [0.30, 0.101, 0.100]) == 4  # within 2% of the best
    assert choose_dimension([2, 4], [float("nan"), float("nan")]) is None


def test_constant_and_empty_neurons_are_left_out_and_the_rest_stays_finite(tmp_path):
    """A neuron constant in every recording gets NaN parameters and a warning; a neuron NaN
    throughout one recording is left out of that one only; every latent stays finite."""
    paths = two_recordings(tmp_path, 3, [(0, 20), (10, 30)], (800, 800))
    for path, edit in zip(paths, ("constant", "empty"), strict=True):
        z = dict(np.load(path))
        if edit == "constant":
            z["activity"][:, 3] = 1.5  # neuron 3: only in a, constant there
        else:
            z["activity"][:, 5] = np.nan  # neuron 15 (column 5 of b): NaN throughout in b
        np.savez(path, **z)
    store = ingest_dataset([{"path": str(p)} for p in paths], tmp_path / "ds" / "data.zarr")
    res = fit_store(store, 2, StitchedSettings(lags=4, device="cpu", max_passes=60))
    ids = DatasetStore(store).neuron_ids.tolist()
    assert res.metrics["left_out"] == {
        "a": {"never_observed": [], "constant": [ids[3]]},
        "b": {"never_observed": [ids[15]], "constant": []},
    }
    assert any("constant in it are left out" in w for w in res.warnings)
    assert any("fitted by no recording" in w for w in res.warnings)
    p = res.fits["stitched_lds"].params
    assert np.isnan(p.C[3]).all() and np.isnan(p.R[3])
    assert np.isfinite(np.delete(p.C, 3, 0)).all() and np.isfinite(np.delete(p.R, 3)).all()
    for post in res.latents:  # neuron 15 is fitted from a; b's latents are all finite
        assert torch.isfinite(post.mean).all() and torch.isfinite(post.var).all()
    assert np.isfinite(res.metrics["summary"]["heldout_rel_error"])
    # the NaN rows of the left-out neuron are by design; nothing else written is non-finite
    assert res.metrics["nonfinite_written"]["C"] == 0 and not any(
        res.metrics["nonfinite_written"].values()
    )


def test_unexpected_nonfinite_counts_all_but_the_allowed_rows():
    from poplds._results import unexpected_nonfinite

    C = np.ones((4, 2))
    C[1] = np.nan  # a left-out neuron
    A = np.array([[np.inf, 0.0], [0.0, 1.0]])
    got = unexpected_nonfinite({"C": C, "A": A}, np.array([False, True, False, False]))
    assert got == {"C": 0, "A": 1}
    C[2, 0] = np.nan
    assert unexpected_nonfinite({"C": C}, np.array([False, True, False, False])) == {"C": 1}


def test_a_recording_with_nothing_that_varies_is_refused():
    y = np.ones((100, 4))
    y[:, 2] = np.nan
    with pytest.raises(InputError, match="^flat: every one of its 4 neurons is constant"):
        stitched.fit(
            [RecordingInput("flat", y, np.arange(4))], 4, 1, StitchedSettings(lags=3, device="cpu")
        )


KILLED_STITCHED = """
import sys, numpy as np, torch
from poplds import simulate, stitched
from poplds.stitched import RecordingInput, StitchedSettings
from poplds.stitched._loss import DataTerm
torch.set_num_threads(1)
calls = [0]
def counting(real):
    def f(*a, **k):
        calls[0] += 1
        return real(*a, **k)
    return f
for name in ("full", "sweep", "window"):  # every read of the data, by every optimiser
    setattr(DataTerm, name, counting(getattr(DataTerm, name)))
p = simulate.random_stitched_lds(60, 4, eig_moduli=(0.8, 0.97), noise_to_signal=1.0, seed=5)
layout = [simulate.SimRecording("a", (0, 40), 3000), simulate.SimRecording("b", (25, 60), 3000)]
ys, _ = simulate.simulate_stitched(p, layout, seed=6)
recs = [RecordingInput(r.name, y, np.arange(*r.neurons)) for r, y in zip(layout, ys)]
kw = dict(lags=5, device="cpu", tol=1e-12, max_passes=300, optimizer=sys.argv[3], max_epochs=25)
if sys.argv[3] == "subspace":  # on the data route, where it forms and keeps projections
    kw.update(route="data", max_passes=6)
if sys.argv[1] == "-":
    fit = stitched.fit(recs, 60, 4, StitchedSettings(**kw))
else:
    fit = stitched.fit(recs, 60, 4, StitchedSettings(**kw), checkpoint=sys.argv[1],
                       checkpoint_every_s=0.0)
np.savez(sys.argv[2], C=fit.params.C, A=fit.params.A, trace=np.array([v for _, _, v in fit.trace]),
         passes=[fit.info.free.passes, fit.info.linked.passes], calls=calls[0])
"""


@pytest.mark.parametrize("optimizer", ["lbfgs", "sgd", "subspace"])
def test_killed_stitched_fit_resumes_to_the_same_result(tmp_path, optimizer):
    """SIGKILL a checkpointing stitched fit in its first stage, run it again: it resumes from
    the checkpoint (L-BFGS: between blocks of iterations; SGD: between epochs; subspace:
    between passes) and ends with
    exactly the fit (loadings, dynamics, every pass's or epoch's loss) of an uninterrupted
    fit."""
    import subprocess
    import sys
    import time

    ckpt = tmp_path / "fit.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_STITCHED, str(ckpt), str(tmp_path / "x.npz"), optimizer]
    )
    t = time.perf_counter()
    while not ckpt.exists() and time.perf_counter() - t < 60:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    saved = torch.load(ckpt, weights_only=False)["state"]
    assert saved["current"] is not None or saved["done"]  # something to resume from
    assert "warm/linked" not in saved["done"]  # killed before the end
    for args in ((str(ckpt), "resumed.npz"), ("-", "whole.npz")):
        run = subprocess.run(
            [sys.executable, "-c", KILLED_STITCHED, args[0], str(tmp_path / args[1]), optimizer],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr[-2000:]
    a, b = np.load(tmp_path / "resumed.npz"), np.load(tmp_path / "whole.npz")
    for key in ("C", "A", "trace", "passes"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["calls"] < b["calls"]  # it continued; it did not start again


def test_numerical_guards_count_what_they_changed():
    from collections import Counter

    from poplds._linalg import psd_project, stabilise

    g: Counter = Counter()
    M = np.array([[1.0, 0.0], [0.0, -0.5]])
    P = psd_project(M, 0.0, guards=g)
    assert g["psd_floor"] == 1 and np.linalg.eigvalsh(P).min() >= 0
    psd_project(torch.eye(2, dtype=torch.float64), 0.0, guards=g)  # nothing to change
    assert g["psd_floor"] == 1
    A = np.diag([1.2, 0.5])
    assert np.abs(np.linalg.eigvals(stabilise(A, 0.99, guards=g))).max() <= 0.99 + 1e-12
    stabilise(np.diag([0.3, 0.5]), 0.99, guards=g)
    assert g["stable_cap"] == 1
    _, recs = simulated(N=30, n=2, T=800)
    fit = stitched.fit(recs, 30, 2, StitchedSettings(lags=4, device="cpu", max_passes=40))
    assert set(fit.info.guards) == {"stable_cap", "psd_floor", "noise_floor"}
    assert all(isinstance(v, int) and v >= 0 for v in fit.info.guards.values())
