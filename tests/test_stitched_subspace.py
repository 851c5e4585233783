"""Subspace moment matching: the restricted loss is the loss, a pass's gradient is the
gradient, and the optimiser reaches the L-BFGS optimum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_stitched_loss import small_dataset

from poplds.stitched._basis import MEMORY, Basis
from poplds.stitched._loss import DataTerm, LossTensors, loss_and_grad
from poplds.stitched._optimizers import choose_optimizer
from poplds.stitched._prepare import prepare_data

CPU = torch.device("cpu")


def _basis(route, n=2, directions=3, seed=5):
    """A basis on the small three-recording dataset (float64, held-out pairs): a random
    point and ``directions`` random directions, their projections formed by passes."""
    rng = np.random.default_rng(seed)
    recs, n_total = small_dataset(rng)
    data = prepare_data(
        recs, n_total, lags=4, device=CPU, heldout_fraction=0.3, seed=3, dtype=torch.float64
    )
    term = DataTerm(data, data.weights(CPU), n, route=route, window_rows=7)
    tens = LossTensors.of(data, CPU)
    basis = Basis(term, tens)
    C0 = torch.as_tensor(rng.standard_normal((data.n_neurons, n)))
    X = torch.as_tensor(rng.standard_normal((data.lags, n, n))) * 0.5
    keep: dict = {}
    term.full(C0, X, keep=keep)
    basis.start(C0[basis.order].clone(), keep)
    for _ in range(directions):
        basis.queue(torch.as_tensor(rng.standard_normal(basis.D[0].shape)))
        basis.point_gradient(X, tens)  # forms the queued direction's projections
    return data, term, tens, basis, X, rng


@pytest.mark.parametrize("route", ["data", ["data", "moments", "data"]])
def test_restricted_loss_equals_a_full_pass(route):
    """At random coefficients of a point and three directions, the loss from the lagged
    moments of the stored projections (no data read) equals the loss of a full pass over the
    data at the same loadings, to 1e-10, and its gradient in each direction's coefficient is
    the full gradient projected on that direction, group by group."""
    data, term, tens, basis, X, rng = _basis(route)
    G, n = len(basis.bounds), 2
    assert basis.m == 3
    Gam = torch.eye(n, dtype=torch.float64).repeat(G, 1, 1)
    Gam = (Gam + 0.3 * torch.as_tensor(rng.standard_normal(Gam.shape))).requires_grad_(True)
    gam = torch.as_tensor(rng.standard_normal((3, G))).requires_grad_(True)
    Xr = X.clone().requires_grad_(True)
    loss = basis.loss(Gam, gam, Xr, tens)
    loss.backward()
    Cs = basis.loadings(Gam.detach(), gam.detach())
    C = basis.full_loadings(Cs)
    Xf = X.clone().requires_grad_(True)
    ref, gC = loss_and_grad(term, C, Xf, tens)
    np.testing.assert_allclose(float(loss.detach()), float(ref), rtol=1e-10)
    np.testing.assert_allclose(Xr.grad.numpy(), Xf.grad.numpy(), rtol=1e-9, atol=1e-12)
    gs = gC[basis.order]
    for j, Dj in enumerate(basis.D[1:]):
        per_group = torch.zeros(G, dtype=torch.float64).index_add_(0, basis.gid, (Dj * gs).sum(1))
        np.testing.assert_allclose(gam.grad[j].numpy(), per_group.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("route", ["data", ["data", "moments", "data"]])
def test_a_pass_gives_the_full_gradient(route):
    """The gradient a pass forms at the point (the data route through ``sum_t y dL/dz'``
    from the projections, the model terms on C) equals a full pass's, to 1e-10."""
    data, term, tens, basis, X, _ = _basis(route, directions=1)
    grad = basis.point_gradient(X, tens)
    _, gC = loss_and_grad(term, basis.full_loadings(basis.D[0]), X, tens)
    np.testing.assert_allclose(grad.numpy(), gC[basis.order].numpy(), rtol=1e-10, atol=1e-13)


def test_directions_are_orthogonal_per_group_and_the_point_moves():
    """Each direction is orthogonal, group by group, to the point's columns and to the
    directions before it; a move makes the coefficients' loadings the new point, with the
    same loss, and the step a direction."""
    data, term, tens, basis, X, rng = _basis("data")
    for j, Dj in enumerate(basis.D[1:]):
        for a, b in basis.bounds:
            assert torch.linalg.norm(basis.D[0][a:b].T @ Dj[a:b]) <= 1e-9 * torch.linalg.norm(
                Dj[a:b]
            ) * torch.linalg.norm(basis.D[0][a:b])
            for Di in basis.D[1 : j + 1]:
                assert abs(float((Di[a:b] * Dj[a:b]).sum())) <= 1e-9 * float(
                    torch.linalg.norm(Di[a:b]) * torch.linalg.norm(Dj[a:b])
                )
    G = len(basis.bounds)
    Gam = torch.eye(2, dtype=torch.float64).repeat(G, 1, 1) * 1.1
    gam = torch.as_tensor(rng.standard_normal((basis.m, G))) * 0.2
    before = float(basis.loss(Gam, gam, X, tens))
    target = basis.loadings(Gam, gam)
    basis.move(Gam, gam)
    np.testing.assert_allclose(basis.D[0].numpy(), target.numpy(), rtol=1e-12)
    assert basis.kinds[-1] == "step"
    Gi = torch.eye(2, dtype=torch.float64).repeat(G, 1, 1)
    after = float(basis.loss(Gi, torch.zeros((basis.m, G), dtype=torch.float64), X, tens))
    np.testing.assert_allclose(after, before, rtol=1e-10)


def test_optimizer_choice_names_subspace():
    from poplds._errors import InputError

    data, term, *_ = _basis("data", directions=0)
    assert choose_optimizer(term, "subspace").name == "subspace"
    with pytest.raises(InputError, match="auto or one of lbfgs, sgd, subspace, got 'adam'"):
        choose_optimizer(term, "adam")


def test_linear_diagonal_is_first_order_exact():
    """The inner solve's first-order expansion of the lag-0 diagonal terms (taken where they
    are a negligible share of the pairs) has the exact loss and gradients at its point, and
    differs from the exact loss by second-order terms only away from it."""
    data, term, tens, basis, X, rng = _basis("data")
    G, m = len(basis.bounds), basis.m
    Gam0 = torch.eye(2, dtype=torch.float64).repeat(G, 1, 1)
    gam0 = torch.zeros((m, G), dtype=torch.float64)
    lin = basis.linear_diagonal(Gam0, gam0, X[0], tens)
    grads = []
    for diagonal in (None, lin):
        Gam, gam, Xr = (v.clone().requires_grad_(True) for v in (Gam0, gam0, X))
        loss = basis.loss(Gam, gam, Xr, tens, diagonal)
        loss.backward()
        grads.append((float(loss.detach()), Gam.grad, gam.grad, Xr.grad))
    (l0, *g0), (l1, *g1) = grads
    np.testing.assert_allclose(l1, l0, rtol=1e-12)
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-9, atol=1e-14)
    steps = []
    for h in (1e-2, 1e-3):
        dGam = h * torch.as_tensor(rng.standard_normal(Gam0.shape))
        exact = float(basis.loss(Gam0 + dGam, gam0, X, tens))
        approx = float(basis.loss(Gam0 + dGam, gam0, X, tens, lin))
        steps.append(abs(exact - approx))
    assert steps[1] < steps[0] / 30  # second order: 10x smaller step, ~100x smaller error


def test_moments_kept_up_to_date_equal_moments_formed_again():
    """The lagged moments carried through new directions (two GEMMs per lag) and moves (the
    old moments transformed by the new directions' coordinates) equal the moments formed from
    the stored projections from scratch, to 1e-10, after several passes and moves; so do the
    projections (carried by coordinates, against a pass over the data) and the groups' Gram
    matrices (grown by a direction's products, carried by coordinates), and the directions
    stay orthogonal per group."""
    data, term, tens, basis, X, rng = _basis("data", directions=2)
    G = len(basis.bounds)
    for _ in range(MEMORY + 2):  # past the memory, so that directions are dropped too
        Gam = torch.eye(2, dtype=torch.float64).repeat(G, 1, 1)
        Gam = Gam + 0.2 * torch.as_tensor(rng.standard_normal(Gam.shape))
        gam = 0.3 * torch.as_tensor(rng.standard_normal((basis.m, G)))
        basis.move(Gam, gam)
        basis.queue(torch.as_tensor(rng.standard_normal(basis.D[0].shape)))
        basis.point_gradient(X, tens)
    kept = {k: M.clone() for k, M in basis.M.items()}
    kept_W = basis.W.clone()
    Q = torch.stack([basis.full_loadings(d) for d in basis.D])
    zero = {k: term.projection_buffer(k, 1)[0] for k in basis.data_recs}
    fresh, _ = term.sweep(Q, zero)
    for k, P in fresh.items():
        scale = float(torch.linalg.norm(P))
        np.testing.assert_allclose(basis.P[k].numpy(), P.numpy(), rtol=0, atol=1e-10 * scale)
    for j, Dj in enumerate(basis.D[1:]):
        for a, b in basis.bounds:
            norm = float(torch.linalg.norm(Dj[a:b]))
            assert torch.linalg.norm(basis.D[0][a:b].T @ Dj[a:b]) <= 1e-9 * norm * float(
                torch.linalg.norm(basis.D[0][a:b])
            )
            for Di in basis.D[1 : j + 1]:
                inner = abs(float((Di[a:b] * Dj[a:b]).sum()))
                assert inner <= 1e-9 * norm * float(torch.linalg.norm(Di[a:b]))
    basis.refresh()
    np.testing.assert_allclose(
        kept_W.numpy(), basis.W.numpy(), rtol=0, atol=1e-10 * float(torch.linalg.norm(basis.W))
    )
    for k, M in basis.M.items():
        scale = float(torch.linalg.norm(M))
        np.testing.assert_allclose(kept[k].numpy(), M.numpy(), rtol=0, atol=1e-10 * scale)
