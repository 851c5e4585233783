"""Minibatch SGD: every window once per epoch, unbiased gradients, the L-BFGS optimum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_stitched_loss import small_dataset

from poplds import simulate, stitched
from poplds.stitched._loss import DataTerm, LossTensors, loss_and_grad
from poplds.stitched._optimizers import registry
from poplds.stitched._prepare import RecordingInput, prepare_data
from poplds.stitched._sgd import epoch_order, minibatch_loss_and_grad
from poplds.stitched._stage import StageProblem, run_stage
from poplds.stitched.evaluate import covariance_scores
from poplds.stitched.settings import StitchedSettings

CPU = torch.device("cpu")


def _term(route, rows=7, heldout=0.3):
    rng = np.random.default_rng(5)
    recs, n_total = small_dataset(rng)
    data = prepare_data(
        recs, n_total, lags=4, device=CPU, heldout_fraction=heldout, seed=3, dtype=torch.float64
    )
    term = DataTerm(data, data.weights(CPU), 2, route=route, window_rows=rows)
    return data, term, rng


@pytest.mark.parametrize("route", ["data", ["data", "moments", "data"]])
def test_minibatch_gradients_average_to_the_full_gradient(route):
    """At a fixed point, the mean of L_c and of its gradients (in C and, through X's graph, in
    A and L of the linked stage) over the windows of an epoch equals the full pass, with one
    recording on the moments route or none."""
    data, term, rng = _term(route)
    tens = LossTensors.of(data, CPU)
    C = torch.as_tensor(rng.standard_normal((data.n_neurons, 2)))
    A = torch.tensor([[0.8, -0.3], [0.3, 0.7]], dtype=torch.float64, requires_grad=True)
    L = torch.tensor([[1.0, 0.0], [0.4, 0.7]], dtype=torch.float64, requires_grad=True)

    def X():
        return stitched.models.linked_lagged(A, L @ L.T, data.lags)

    loss, gC = loss_and_grad(term, C, X(), tens)
    gA, gL = A.grad.clone(), L.grad.clone()
    wins = term.windows()
    assert len(wins) > 10
    mean_loss, mean_gC = 0.0, torch.zeros_like(C)
    A.grad = L.grad = None
    for win in wins:
        lc, gc = minibatch_loss_and_grad(term, win, None, C, X(), tens, float(len(wins)))
        mean_loss += float(lc) / len(wins)
        mean_gC += gc / len(wins)
    np.testing.assert_allclose(mean_loss, float(loss), rtol=1e-11)
    np.testing.assert_allclose(mean_gC.numpy(), gC.numpy(), rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(A.grad.numpy() / len(wins), gA.numpy(), rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(L.grad.numpy() / len(wins), gL.numpy(), rtol=1e-9, atol=1e-13)


def test_every_window_is_visited_once_per_epoch(monkeypatch):
    """The dynamax#414 class of bug: an epoch must step on every minibatch, each once, and
    the order changes between epochs but not between runs."""
    data, term, rng = _term("data")
    tens = LossTensors.of(data, CPU)
    seen: list = []
    original = term.window

    def spy(win, *args, **kwargs):
        seen.append(win)
        return original(win, *args, **kwargs)

    monkeypatch.setattr(term, "window", spy)
    C = torch.as_tensor(rng.standard_normal((data.n_neurons, 2))).requires_grad_(True)
    Xt = torch.stack([torch.eye(2, dtype=torch.float64) * 0.8**s for s in range(4)])
    Xt.requires_grad_(True)
    wins = term.windows()
    spec = registry()["sgd"]
    options = spec.options(learning_rate=0.01, max_epochs=3, minibatch_rows=7)
    problem = StageProblem("free", [C, Xt], lambda: Xt, term, tens, 1e-12, data.noise_floor())
    record = run_stage(spec, options, problem, [], {})
    assert record.epochs == 3 and record.steps == 3 * len(wins) and record.stop == "max_epochs"
    for e in range(3):
        epoch = seen[e * len(wins) : (e + 1) * len(wins)]
        assert sorted(epoch, key=lambda w: (w.rec, w.t0)) == wins
    assert seen[: len(wins)] != seen[len(wins) : 2 * len(wins)]
    np.testing.assert_array_equal(epoch_order(9, 1, "free", 2), epoch_order(9, 1, "free", 2))


def test_sgd_and_subspace_reach_the_lbfgs_optimum():
    """On a small two-recording simulation on the data route, SGD's and the subspace
    optimiser's never co-observed covariances match L-BFGS's within 0.002 (correlation
    against the truth), the subspace optimiser's final loss is within the convergence
    tolerance of L-BFGS's or below it, and the same seed gives the same fit."""
    N, n, T = 80, 3, 3000
    p = simulate.random_stitched_lds(N, n, seed=2)
    layout = [simulate.SimRecording("a", (0, 48), T), simulate.SimRecording("b", (32, N), T)]
    ys, _ = simulate.simulate_stitched(p, layout, seed=2)
    recs = [
        RecordingInput(r.name, y.astype(np.float32), np.arange(*r.neurons))
        for r, y in zip(layout, ys, strict=True)
    ]
    truth = stitched.StitchedLDSParams.from_dynamics(p.A, p.C, p.Q, p.R, p.Pi, 10)
    scores = {}
    losses = {}
    for opt in ("lbfgs", "sgd", "sgd", "subspace", "subspace"):
        f = stitched.fit(recs, N, n, StitchedSettings(device="cpu", optimizer=opt, route="data"))
        assert f.info.optimizer == opt and f.info.stop == "converged"
        cov = covariance_scores(f.params, f.data, truth=truth)
        r = np.mean([row["corr"] for row in cov["never_vs_truth"][:5]])
        if opt in scores:
            assert r == scores[opt]  # deterministic for a seed
        scores[opt] = r
        losses[opt] = (f.info.linked.loss, f.info.noise_floor)
    assert scores["lbfgs"] > 0.95
    assert abs(scores["sgd"] - scores["lbfgs"]) < 0.002, scores
    assert abs(scores["subspace"] - scores["lbfgs"]) < 0.002, scores
    (ours, floor), (ref, _) = losses["subspace"], losses["lbfgs"]
    assert ours < ref + 1e-3 * floor, losses
