"""Stitch validation and the moving-block bootstrap: replicate moments against the resampled
data, validation pairs kept out of the loss, coverage of the intervals on a simulation, the
block length, and the one-standard-error choice of n."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import simulated

from poplds import stitched
from poplds.report import choose_stitched, one_se_choice
from poplds.stitched import RecordingInput, StitchedSettings, _refit, checks, prepare_data
from poplds.stitched._linear import GaussNewton, projected_gradients
from poplds.stitched._loss import DataTerm, LossTensors, lagged_moments, loss_and_grad
from poplds.stitched._projected import draws, group_projections, replicate_data
from poplds.stitched._refit import ReplicateLoss
from poplds.stitched.bootstrap import (
    ATOMS_PER_BLOCK,
    atom_moments,
    percentile_interval,
    politis_white,
    resample_counts,
)
from poplds.stitched.checks import check_fit
from poplds.stitched.evaluate import covariance_scores
from poplds.stitched.models import StitchedLDSParams
from poplds.stitched.validation import (
    choose_hidden,
    pooled_variance,
    reduced_data,
    validation_pairs,
)

CPU = torch.device("cpu")


def _recordings(N=90, n=4, T=3000, seed=3, overlap=12, n_rec=3):
    return simulated(N, n, overlap, T, seed, n_rec, moduli=(0.85, 0.97))


def test_replicate_moments_equal_those_of_the_resampled_data():
    """A replicate's lagged sums, formed from the atoms, equal the lagged sums computed
    directly on the resampled series: its moving blocks laid end to end, each with the K-1
    rows before it, every pair whose later row lies in a block counted once."""
    rng = np.random.default_rng(0)
    T, N, K, a, m = 523, 7, 4, 17, 3
    y = rng.standard_normal((T, N)).cumsum(0).astype(np.float64) * 0.1 + rng.standard_normal((T, N))
    data = prepare_data(
        [RecordingInput("r", y, np.arange(N))], N, lags=K, device=CPU, dtype=torch.float64
    )
    rec = data.recordings[0]
    atoms = atom_moments(rec, K, a, m, CPU)
    # the atoms add up to the fit's own lagged sums
    torch.testing.assert_close(atoms.total(), lagged_moments(rec, K, CPU), rtol=1e-12, atol=1e-9)
    # a replicate: the same draws, then the resampled data built row by row
    draw = np.random.default_rng(5)
    c = resample_counts(atoms.n_atoms, m, draw)
    starts = np.random.default_rng(5).integers(
        0, atoms.n_atoms - m + 1, size=int(np.ceil(atoms.n_atoms / m))
    )
    Y = rec.data.cpu().numpy()  # prepared rows (centred), group order
    S = np.zeros((K, N, N))
    pairs = np.zeros(K)
    for b in starts:
        lo, hi = b * a, min((b + m) * a, T)  # the block's own rows
        for u in range(lo, hi):
            for s in range(K):
                if u - s >= 0:
                    S[s] += np.outer(Y[u], Y[u - s])
                    pairs[s] += 1
    S *= ((T - np.arange(K)) / pairs)[:, None, None]
    np.testing.assert_allclose(atoms.replicate(c).numpy(), S, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("kron", [True, False])
def test_replicate_loss_is_the_fit_loss(monkeypatch, stacked, kron):
    """The refits' loss of every replicate equals the fit's own reduced loss (moments route,
    itself tested against dense algebra) on the same sums, up to its constant: equal
    differences between two points and equal gradients; and the gradients by hand equal
    autograd's. Recordings padded into one block or one block each; the square term through
    ``X (x) X`` or n-by-n products."""
    monkeypatch.setattr(_refit, "PAD_SHARE", 10.0 if stacked else -1.0)
    monkeypatch.setattr(_refit, "KRON_MAX_DIM", 10 if kron else 0)  # n = 3
    _, recs = _recordings(T=400)
    recs[1] = RecordingInput(recs[1].name, recs[1].activity[:, :25], recs[1].neurons[:25])
    K, n = 4, 3
    data = prepare_data(
        recs, 90, lags=K, device=CPU, dtype=torch.float64, heldout_fraction=0.3, seed=2
    )
    moments = [lagged_moments(r, K, CPU).to(torch.float64) for r in data.recordings]
    V = pooled_variance(data, moments)
    d = replace(data, variance=V, diag0=V)
    f = ReplicateLoss(d, [moments, moments], [V, V])
    assert len(f.blocks) == (1 if stacked else 3)
    g = np.random.default_rng(1)
    C = torch.as_tensor(g.standard_normal((2, 90, n)) * 0.5)
    X = torch.as_tensor(g.standard_normal((2, K, n, n)) * 0.3)
    X[:, 0] = X[:, 0] @ X[:, 0].transpose(1, 2) + torch.eye(n)
    # the fit's loss at both points
    tens = LossTensors.of(d, CPU)
    term = DataTerm(d, d.weights(CPU), n, route="moments")
    ref = []
    for b in range(2):
        Xb = X[b].clone().requires_grad_(True)
        loss, gC = loss_and_grad(term, C[b].clone(), Xb, tens)
        ref.append((float(loss), gC, Xb.grad))
    Cg, Xg = C.clone().requires_grad_(True), X.clone().requires_grad_(True)
    f(Cg, Xg).sum().backward()
    L = f(C, X)
    # products in float32 (PRODUCT_DTYPE): agreement to float32's precision
    scale = max(abs(r[0]) for r in ref)
    np.testing.assert_allclose(float(L[0] - L[1]), ref[0][0] - ref[1][0], atol=1e-5 * scale)
    for b in range(2):
        torch.testing.assert_close(Cg.grad[b], ref[b][1], rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(Xg.grad[b], ref[b][2], rtol=1e-4, atol=1e-5 * scale)
    L2, dC, dX = f.value_and_grad(C, X)
    torch.testing.assert_close(L2, L, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dC, Cg.grad, rtol=1e-4, atol=1e-6 * scale)
    torch.testing.assert_close(dX, Xg.grad, rtol=1e-9, atol=1e-12 * scale)


def test_validation_pairs_are_never_in_the_loss():
    """Hidden neurons stay observed elsewhere, every overlap keeps ``keep`` neurons, and the
    validation pairs' entries of the lagged sums change neither the loss nor its gradient."""
    p, recs = _recordings()
    data = prepare_data(recs, 90, lags=5, device=CPU, heldout_fraction=0.1, seed=0)
    keep = 8
    hidden = choose_hidden(data, 0.3, keep, seed=1)
    assert hidden, "the layout shares 12 neurons per overlap: some must be hidden"
    red = reduced_data(data, hidden, 0.1)
    # each hidden neuron is still observed; every recording pair keeps its overlap
    for pos in np.concatenate(list(hidden.values())):
        assert red.data.group_of[pos] >= 0
    sets = [set(r.neurons.tolist()) for r in red.data.recordings]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            full = len(set(data.recordings[i].neurons) & set(data.recordings[j].neurons))
            if full:
                assert len(sets[i] & sets[j]) >= min(keep, full)
    pairs = validation_pairs(data, red)
    assert pairs and sum(len(q.hidden) * len(q.other) for q in pairs) > 50
    # the loss of the validation fit, with the validation pairs' sums perturbed
    full = [lagged_moments(r, 5, CPU).to(torch.float64) for r in data.recordings]
    bumped = [S.clone() for S in full]
    for q in pairs:
        h, o = torch.as_tensor(q.hidden), torch.as_tensor(q.other)
        bumped[q.rec][:, h[:, None], o[None, :]] += 1e3
        bumped[q.rec][:, o[:, None], h[None, :]] -= 1e3
    g = np.random.default_rng(2)
    C = torch.as_tensor(g.standard_normal((1, 90, 4)))
    X = torch.as_tensor(g.standard_normal((1, 5, 4, 4)))

    def loss_and_grads(d, moments):  # the refits' loss (one replicate) and its gradients
        f = ReplicateLoss(d, [moments], [pooled_variance(d, moments)])
        Cg, Xg = C.clone().requires_grad_(True), X.clone().requires_grad_(True)
        loss = f(Cg, Xg).sum()
        loss.backward()
        return loss.detach(), Cg.grad, Xg.grad

    out = [loss_and_grads(red.data, red.moments(m)) for m in (full, bumped)]
    for a, b in zip(out[0], out[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)
    # and the same perturbation on the full data (where those pairs are co-observed) does
    assert not torch.allclose(loss_and_grads(data, bumped)[0], loss_and_grads(data, full)[0])


@pytest.fixture(scope="module")
def checked():
    p, recs = _recordings()
    s = StitchedSettings(lags=6, device="cpu", seed=0, bootstrap=20)
    fit = stitched.fit(recs, 90, 4, s)
    truth = StitchedLDSParams.from_dynamics(p.A, p.C, p.Q, p.R, p.Pi, 6)
    scores = covariance_scores(fit.params, fit.data, truth=truth, seed=0)
    fig = scores["_figure"]
    metrics, arrays = check_fit(fit, s, 4, scores=scores, rate_hz=10.0)
    return fit, truth, fig, metrics, arrays


def test_intervals_cover_the_truth_of_a_simulation(checked):
    """The nominal 90 % intervals of the never co-observed covariances cover their truth at
    a rate between 75 % and 99 % (one simulation, 20 replicates: the calibration benchmark
    measures it over many), and they are narrow: their median width is below a third of
    the spread of the true covariances."""
    fit, truth, fig, metrics, arrays = checked
    boot = metrics["bootstrap"]
    cover = boot["coverage_vs_truth"]["never"]
    assert 0.75 <= cover <= 0.99, cover
    never = fig["cls"] == 2
    width = (arrays["pred_hi"] - arrays["pred_lo"])[never]
    assert np.median(width) < 0.35 * np.std(fig["true"][never])
    # the point prediction lies inside its own interval for nearly every pair
    inside = (arrays["pred_lo"] <= fig["pred"]) & (fig["pred"] <= arrays["pred_hi"])
    assert inside[fig["cls"] >= 0].mean() > 0.9
    # time constants: the interval holds the estimate
    tc = boot["time_constant_s"]
    assert all(lo <= v <= hi for v, lo, hi in zip(tc["value"], tc["lo"], tc["hi"], strict=True))


def test_stitch_validation_scores_the_stitch(checked):
    fit, truth, fig, metrics, arrays = checked
    val = metrics["stitch_validation"]
    assert "skipped" not in val
    assert val["n_pairs"] > 50 and val["corr"] > 0.9 and val["rel_error"] < 0.5
    assert 0.6 <= val["coverage"] <= 1.0
    # a validation pair's empirical covariance is what the recording's data say
    assert arrays["val_emp"].shape == arrays["val_pred"].shape


def test_checks_are_skipped_with_a_reason_without_overlaps():
    """One recording: no pair is ever hidden, and metrics.json says why."""
    p, recs = _recordings(n_rec=1, T=1500)
    s = StitchedSettings(lags=4, device="cpu", bootstrap=3)
    fit = stitched.fit(recs, 90, 4, s)
    scores = covariance_scores(fit.params, fit.data, seed=0)
    metrics, _ = check_fit(fit, s, 4, scores=scores, rate_hz=1)
    assert "no recording shares" in metrics["stitch_validation"]["skipped"]
    assert metrics["bootstrap"]["replicates"] == 3
    assert set(metrics["bootstrap"]["refit_stops"]) == {"converged"}
    # refits cut short by max_passes say so
    short = replace(s, max_passes=2)
    metrics, _ = check_fit(fit, short, 4, scores=scores, rate_hz=1)
    assert "stopped before their convergence test" in metrics["bootstrap"]["warnings"][0]


def test_block_length_follows_the_autocorrelation():
    """Politis-White: longer blocks for slower series, about T^(1/3) scaling, and short ones
    for white noise."""
    g = np.random.default_rng(0)
    T = 20000
    white = g.standard_normal(T)
    lengths = []
    for rho in (0.5, 0.9, 0.98):
        x = np.zeros(T)
        for t in range(1, T):
            x[t] = rho * x[t - 1] + white[t]
        lengths.append(politis_white(x))
    assert politis_white(white) < 5
    assert lengths[0] < lengths[1] < lengths[2]
    # AR(1): b = (2 G^2 / D)^(1/3) T^(1/3) with G = 2 rho/(1-rho)^2 g0 / (1 - rho^2) ...
    # checked loosely: within a factor of 2 of the closed form
    for rho, b in zip((0.5, 0.9, 0.98), lengths, strict=True):
        G = 2 * rho / ((1 - rho) ** 2 * (1 - rho**2))
        g = (1 + rho) / ((1 - rho) * (1 - rho**2))
        exact = (2 * G**2 / (4 / 3 * g**2)) ** (1 / 3) * T ** (1 / 3)
        assert exact / 2 < b < exact * 2, (rho, b, exact)


def test_percentile_interval_positions():
    """Weibull positions: a fresh draw falls inside the interval of B = 19 replicates with
    probability 90 % (measured over many trials)."""
    g = np.random.default_rng(1)
    x = g.standard_normal((20000, 20))
    lo, hi = percentile_interval(x[:, :19], 0.9, axis=1)
    inside = (lo <= x[:, 19]) & (x[:, 19] <= hi)
    assert abs(inside.mean() - 0.9) < 0.01


def test_one_standard_error_choice():
    assert one_se_choice([2, 4, 6], [0.7, 0.12, 0.11], [0.06, 0.03, 0.04]) == (4, 0.15)
    assert one_se_choice([2, 4, 6], [0.7, 0.2, 0.11], [0.06, 0.03, 0.04])[0] == 6
    assert one_se_choice([2, 4], [float("nan")] * 2, [None, None]) == (None, None)
    metrics = [
        {
            "settings": {"latent_dim": d},
            "summary": {"heldout_rel_error": h, "heldout_rel_error_se": 0.01},
        }
        for d, h in ((2, 0.3), (4, 0.105), (8, 0.1))
    ]
    choice = choose_stitched(metrics)
    assert choice["criterion"] == "held-out" and choice["chosen"] == 4
    assert "no stitch validation" in choice["reason"]


class _Counted:
    """A (time, neurons) source that counts the rows read from it (copies: rows are centred
    in place by the reader)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.rows = array, 0
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, key):
        out = np.array(self.array[key], copy=True)
        if isinstance(key, slice):
            self.rows += out.shape[0]
        return out


def test_projected_gradients_equal_those_of_the_formed_sums():
    """The Gauss-Newton bootstrap's replicate gradients, formed from the stored projections
    and one pass over streamed windows of the data (with halos), equal those of the replicates' own
    lagged sums formed from atoms (the refit route's ReplicateLoss); so do their variances
    and the scored neurons' lagged sums. The two steps read every row twice in all."""
    K, n, B, a = 4, 3, 3, 37
    _, recs = _recordings(T=700)
    s = StitchedSettings(lags=K, device="cpu", seed=0, heldout_fraction=0.2)
    fit = stitched.fit(recs, 90, n, s)
    # streamed from their sources in windows of 5 atoms, every row read counted
    assert all(r.source is not None for r in fit.data.recordings)
    sources = [_Counted(np.asarray(r.source)) for r in fit.data.recordings]
    streamed = [
        replace(r, chunk_rows=5 * a, data=None, source=src)
        for r, src in zip(fit.data.recordings, sources, strict=True)
    ]
    data = replace(fit.data, recordings=streamed)
    p = fit.params
    rng = np.random.default_rng(4)
    atoms = [atom_moments(r, K, a, ATOMS_PER_BLOCK, CPU) for r in data.recordings]
    counts = [[resample_counts(x.n_atoms, ATOMS_PER_BLOCK, rng) for x in atoms] for _ in range(B)]
    moments = [[x.replicate(c) for x, c in zip(atoms, cb, strict=True)] for cb in counts]
    full = [x.total() for x in atoms]
    # the reference: the refit route's loss on the formed sums, differenced at the estimate
    v_ref = [pooled_variance(data, S) for S in [full, *moments]]
    gn = GaussNewton(data, p, B + 1)
    _, dC_all, dX_all = ReplicateLoss(data, [full, *moments], v_ref).value_and_grad(
        gn.theta[0].expand(B + 1, -1, -1), gn.X0.expand(B + 1, -1, -1, -1)
    )
    dC_ref, dX_ref, v_ref = dC_all[1:] - dC_all[0], dX_all[1:] - dX_all[0], v_ref[1:]
    for src in sources:
        src.rows = 0  # the reference above read the data once
    Z = [group_projections(r, p.C[r.neurons], CPU) for r in data.recordings]
    dr = [
        draws(np.stack([c[k] for c in counts]), a, r.n_time, K, CPU)
        for k, r in enumerate(data.recordings)
    ]
    scored = np.array([0, 5, 33, 35, 61, 64, 80])
    rd = replicate_data(data, p.C, p.X, Z, dr, [a] * 3, scored)
    # two passes over the data in all (projections, then the data terms)
    assert [src.rows for src in sources] == [2 * r.n_time for r in data.recordings]
    _, dC, dX = projected_gradients(data, p, rd.dD_dC, rd.CSC, rd.variances)
    scale = float(dC_ref.abs().max())
    torch.testing.assert_close(dC, dC_ref, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(dX, dX_ref, rtol=1e-4, atol=1e-5 * float(dX_ref.abs().max()))
    np.testing.assert_allclose(rd.variances[1:], np.stack(v_ref), rtol=1e-5)  # float32 data
    for k in range(len(data.recordings)):
        cols = torch.as_tensor(rd.sample_cols[k])
        for b in range(B):
            ref = moments[b][k][:, cols][:, :, cols]
            torch.testing.assert_close(rd.sample_sums[k][b + 1], ref, rtol=1e-5, atol=1e-3)


def test_gauss_newton_bootstrap_matches_the_refits(checked, monkeypatch):
    """The Gauss-Newton bootstrap (one step per replicate from the projections) gives the
    refits' intervals: median width of the never co-observed covariances within 10 %, the
    held-out score's standard error within 20 %; its stitch validation gives the refitted
    validation's score (within 15 %) and standard error (within 25 %); its intervals cover
    the truth as the calibration bounds; a fit whose per-atom sums exceed the moment budget
    gets it by itself; and one too large for it gets the reason why not."""
    fit, truth, fig, metrics, arrays = checked
    s = StitchedSettings(lags=6, device="cpu", seed=0, bootstrap=20)
    scores = covariance_scores(fit.params, fit.data, truth=truth, seed=0)
    small = replace(fit, data=replace(fit.data, moment_budget=1.5e6))  # atoms need 2.1 MB
    # (this route's own memory, mostly the projections of these long recordings, is let pass)
    with monkeypatch.context() as mp:
        mp.setattr(checks, "_projected_bytes", lambda fit, B: 0.0)
        m2, a2 = check_fit(small, s, 4, scores=scores, rate_hz=10.0)
    assert m2["bootstrap"]["method"] == "gauss_newton"
    # the stitch validation by Gauss-Newton steps scores the stitch as the refitted one does
    v1, v2 = metrics["stitch_validation"], m2["stitch_validation"]
    assert v2["method"] == "gauss_newton" and v2["n_pairs"] > 50
    assert abs(v2["rel_error"] / v1["rel_error"] - 1) < 0.15, (v1["rel_error"], v2["rel_error"])
    assert abs(v2["corr"] - v1["corr"]) < 0.01
    se = [m["bootstrap"]["summary"]["stitch_rel_error"]["se"] for m in (metrics, m2)]
    assert abs(se[1] / se[0] - 1) < 0.25, se
    assert 0.6 <= v2["coverage"] <= 1.0
    never = fig["cls"] == 2
    w1 = np.median((arrays["pred_hi"] - arrays["pred_lo"])[never])
    w2 = np.median((a2["pred_hi"] - a2["pred_lo"])[never])
    assert abs(w2 / w1 - 1) < 0.1, (w1, w2)
    se = [m["bootstrap"]["summary"]["heldout_rel_error"]["se"] for m in (metrics, m2)]
    assert abs(se[1] / se[0] - 1) < 0.2, se
    assert 0.75 <= m2["bootstrap"]["coverage_vs_truth"]["never"] <= 0.99
    assert m2["bootstrap"]["cg_residual"] < 1e-3
    # where this route's memory exceeds twice the budget, nothing runs, and metrics.json
    # says why
    m3, _ = check_fit(small, s, 4, scores=scores, rate_hz=10.0)
    assert "more than twice the moment budget" in m3["bootstrap"]["skipped"]
    assert "more than twice the moment budget" in m3["stitch_validation"]["skipped"]


def test_summary_says_how_the_intervals_were_made():
    """The front page names the Gauss-Newton bootstrap, its calibration and its warnings
    where it ran, and the refits' calibration otherwise."""
    from poplds.summary import _stitched_section

    def metrics(boot):
        return {
            "settings": {"latent_dim": 2},
            "summary": {"heldout_rel_error": 0.5, "heldout_corr": 0.8},
            "stitch_validation": {"skipped": "too large"},
            "bootstrap": boot,
            "warnings": boot.get("warnings", []),
        }

    base = {"replicates": 20, "level": 0.9, "block_rows": [40, 40]}
    gn = {**base, "method": "gauss_newton", "scored_neurons": 150, "warnings": ["rough!"]}
    choice = {"chosen": 2, "reason": "one SE"}
    page = _stitched_section(choice, [metrics(gn)])
    assert "Gauss-Newton step" in page and "--method gauss_newton" in page and "rough!" in page
    page = _stitched_section(choice, [metrics({**base, "method": "refit"})])
    assert "refitted from the estimate" in page and "Gauss-Newton" not in page


def test_lag_stats_equal_direct_computations():
    """Per-segment scores, vectorised, against np.corrcoef and norms segment by segment;
    short or constant segments are NaN."""
    from poplds.stitched.evaluate import lag_stats

    g = np.random.default_rng(0)
    lengths = np.array([7, 0, 2, 30, 5])
    pred, ref = g.standard_normal(lengths.sum()), g.standard_normal(lengths.sum())
    ref[-5:] = 1.0  # a constant reference
    rows = lag_stats(pred, ref, lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for row, a, n in zip(rows, starts, lengths, strict=True):
        p, r = pred[a : a + n], ref[a : a + n]
        assert row["n_pairs"] == n
        if n < 3 or np.std(r) == 0:
            assert np.isnan(row["corr"]) and np.isnan(row["rel_error"])
            continue
        assert row["corr"] == pytest.approx(np.corrcoef(p, r)[0, 1], rel=1e-12)
        assert row["rel_error"] == pytest.approx(np.linalg.norm(p - r) / np.linalg.norm(r))
