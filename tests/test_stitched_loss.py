"""The moment-matching loss and gradient agree with a dense reference over explicit pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poplds.stitched._loss import DataTerm, LossTensors, loss_and_grad, window_cross
from poplds.stitched._prepare import RecordingInput, prepare_data
from poplds.stitched.models import linked_lagged

torch.set_default_dtype(torch.float64)
CPU = torch.device("cpu")


def small_dataset(rng, missing=False):
    """Three recordings of 9 neurons with partial overlaps and different lengths."""
    layout = [("a", [0, 1, 2, 3, 4], 60), ("b", [3, 4, 5, 6], 45), ("c", [6, 7, 8, 0], 50)]
    recs = []
    for name, idx, t in layout:
        y = rng.standard_normal((t, len(idx))) + np.linspace(0, 1, len(idx))
        y[1:] += 0.6 * y[:-1]
        if missing:
            y[rng.random(y.shape) < 0.05] = np.nan
        recs.append(RecordingInput(name, y, np.array(idx)))
    return recs, 9


def held_out_data(recs, n_total, seed, chunk_rows=None):
    """The small dataset prepared in float64 with 30% of its pairs held out, 4 lags."""
    return prepare_data(
        recs,
        n_total,
        lags=4,
        device=torch.device("cpu"),
        heldout_fraction=0.3,
        seed=seed,
        chunk_rows=chunk_rows,
        dtype=torch.float64,
    )


def dense_loss(recs, n_total, data, C, X):
    """Brute force over every (i, j, s): pooled empirical covariances of co-observed pairs,
    the lag-0 diagonal through the profiled R (the hinge)."""
    K = data.lags
    S = np.zeros((K, n_total, n_total))
    N = np.zeros((K, n_total, n_total))
    for rec in recs:
        y = np.asarray(rec.activity, dtype=np.float64)
        y = y - np.nanmean(y, 0)
        y = np.nan_to_num(y) / (1 - np.isnan(np.asarray(rec.activity)).mean(0))
        idx = rec.neurons
        T = len(y)
        for s in range(K):
            S[s][np.ix_(idx, idx)] += y[s:].T @ y[: T - s]
            N[s][np.ix_(idx, idx)] += T - s
    g = data.group_of
    held = data.heldout[g[:, None], g[None, :]]
    mask = (N > 0) & ~held[None]
    emp = np.where(mask, S / np.maximum(N, 1), 0.0)
    emp_t = torch.as_tensor(emp)
    mask_t = torch.as_tensor(mask)
    M = torch.einsum("ia,sab,jb->sij", C, X, C)
    eye = torch.eye(n_total, dtype=torch.bool)
    off = mask_t.clone()
    off[0] &= ~eye
    resid = torch.where(off, M - emp_t, torch.zeros(()))
    m = torch.diagonal(M[0])
    v = torch.as_tensor(data.variance)
    hinge = torch.clamp(m - v, min=0) ** 2
    P = off.sum()  # pairs in the loss: co-observed, not held out, lag-0 diagonal excluded
    const = torch.sum(torch.where(off, emp_t, torch.zeros(())) ** 2)
    return (torch.sum(resid**2) + hinge.sum()) / P, const / P, int(P)


@pytest.mark.parametrize("route", ["data", "moments"])
@pytest.mark.parametrize("heldout", [0.0, 0.3])
@pytest.mark.parametrize("missing", [False, True])
def test_reduced_loss_and_gradient_match_dense(heldout, missing, route):
    """Both routes of the data term (windows with halos of 16 rows; lagged moments)."""
    rng = np.random.default_rng(0)
    recs, n_total = small_dataset(rng, missing)
    data = prepare_data(
        recs,
        n_total,
        lags=4,
        device=torch.device("cpu"),
        heldout_fraction=heldout,
        seed=1,
        chunk_rows=16,
        dtype=torch.float64,
    )
    n = 3
    C = torch.as_tensor(rng.standard_normal((n_total, n)) * 0.5)
    X = torch.as_tensor(rng.standard_normal((4, n, n)) * 0.3)
    X[0] = X[0] @ X[0].T + torch.eye(n)  # a covariance, so the hinge is active somewhere
    tens = LossTensors.of(data, torch.device("cpu"))
    term = DataTerm(data, data.weights(torch.device("cpu")), n, route=route)
    assert term.routes == [route] * 3
    Xg = X.clone().requires_grad_(True)
    loss, gradC = loss_and_grad(term, C.clone(), Xg, tens)
    Cd = C.clone().requires_grad_(True)
    Xd = X.clone().requires_grad_(True)
    ref, const, n_pairs = dense_loss(recs, n_total, data, Cd, Xd)
    ref.backward()
    assert data.n_pairs() == n_pairs
    if heldout:
        assert data.heldout.any()
    np.testing.assert_allclose(float(loss + const), float(ref.detach()), rtol=1e-8)
    np.testing.assert_allclose(gradC.numpy(), Cd.grad.numpy(), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(Xg.grad.numpy(), Xd.grad.numpy(), rtol=1e-8, atol=1e-12)


def test_linked_gradient_matches_finite_differences():
    """d/dC (two-pass), d/dA and d/dL (autograd through X_s = A^s L L') against central
    differences along random directions."""
    rng = np.random.default_rng(3)
    recs, n_total = small_dataset(rng)
    data = prepare_data(recs, n_total, lags=5, device=torch.device("cpu"), dtype=torch.float64)
    tens = LossTensors.of(data, torch.device("cpu"))
    n = 2
    term = DataTerm(data, data.weights(torch.device("cpu")), n, route="data")
    C = torch.as_tensor(rng.standard_normal((n_total, n)) * 0.5)
    A = torch.as_tensor([[0.8, -0.3], [0.3, 0.8]])
    L = torch.as_tensor([[1.0, 0.0], [0.4, 0.7]])

    def f(C, A, L):
        X = linked_lagged(A, L @ L.T, data.lags)
        return float(loss_and_grad(term, C, X, tens)[0])

    Ag = A.clone().requires_grad_(True)
    Lg = L.clone().requires_grad_(True)
    _, gC = loss_and_grad(term, C.clone(), linked_lagged(Ag, Lg @ Lg.T, data.lags), tens)
    eps = 1e-6
    for _ in range(3):
        dC, dA, dL = (torch.as_tensor(rng.standard_normal(t.shape)) for t in (C, A, L))
        fd = (
            f(C + eps * dC, A + eps * dA, L + eps * dL)
            - f(C - eps * dC, A - eps * dA, L - eps * dL)
        ) / (2 * eps)
        an = float((gC * dC).sum() + (Ag.grad * dA).sum() + (Lg.grad * dL).sum())
        assert an == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_window_cross_gradients_match_autograd():
    """The hand-written gradients of eq. (2) on a window with a halo, against autograd of a
    loop over every (u, s, g, h)."""
    gen = torch.Generator().manual_seed(0)
    Z = torch.randn(20, 3, 2, generator=gen, requires_grad=True)
    X = torch.randn(4, 2, 2, generator=gen, requires_grad=True)
    w = torch.rand(4, 3, 3, generator=gen)
    for h in (0, 3):
        D, dZ, dX = window_cross(Z.detach(), h, X.detach(), w)
        ref = sum(
            w[s, g, k] * Z[u, g] @ X[s] @ Z[u - s, k]
            for s in range(4)
            for u in range(max(h, s), 20)
            for g in range(3)
            for k in range(3)
        )
        gZ, gX = torch.autograd.grad(ref, (Z, X))
        np.testing.assert_allclose(float(D), float(ref.detach()), rtol=1e-12)
        np.testing.assert_allclose(dZ.numpy(), gZ.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dX.numpy(), gX.numpy(), rtol=1e-10, atol=1e-12)


def test_windows_sum_to_the_full_pass_and_cover_every_row():
    """Every row lies in exactly one window, and the windows' terms add up to the pass."""
    rng = np.random.default_rng(4)
    recs, n_total = small_dataset(rng)
    data = held_out_data(recs, n_total, seed=2)
    term = DataTerm(data, data.weights(torch.device("cpu")), 2, route="data", window_rows=7)
    wins = term.windows()
    for k, rec in enumerate(data.recordings):
        rows = np.concatenate([np.arange(w.t0, w.t1) for w in wins if w.rec == k])
        np.testing.assert_array_equal(rows, np.arange(rec.n_time))
    C = torch.as_tensor(rng.standard_normal((n_total, 2)))
    X = torch.as_tensor(rng.standard_normal((4, 2, 2)))
    D, gC, dX = term.full(C, X)
    parts = [term.window(w, C, X) for w in wins]
    np.testing.assert_allclose(float(sum(p[0] for p in parts)), float(D), rtol=1e-12)
    np.testing.assert_allclose(sum(p[1] for p in parts).numpy(), gC.numpy(), rtol=1e-10)
    np.testing.assert_allclose(sum(p[2] for p in parts).numpy(), dX.numpy(), rtol=1e-10)


def test_warm_start_pieces_agree_from_data_and_from_moments():
    """The start's lagged latent covariances and least-squares placements are the same
    whether read from the data or from the masked moments (held-out pairs excluded)."""
    from poplds.stitched._warm import _place_new_neurons, _start_lagged

    rng = np.random.default_rng(6)
    recs, n_total = small_dataset(rng)
    data = held_out_data(recs, n_total, seed=1, chunk_rows=16)
    term = DataTerm(data, data.weights(torch.device("cpu")), 2, route="moments")
    V = torch.as_tensor(rng.standard_normal((len(data.recordings[0].neurons), 2)))
    np.testing.assert_allclose(
        _start_lagged(data, 0, V, term.masked_moments(0)).numpy(),
        _start_lagged(data, 0, V, None).numpy(),
        rtol=1e-10,
    )
    rec = data.recordings[1]
    known = np.zeros(n_total, dtype=bool)
    known[data.recordings[0].neurons] = True
    C0 = torch.as_tensor(rng.standard_normal((n_total, 2))) * torch.as_tensor(known)[:, None]
    X = torch.as_tensor(rng.standard_normal((4, 2, 2)))
    X[0] = X[0] @ X[0].T
    placed = [C0.clone(), C0.clone()]
    _place_new_neurons(data, rec, placed[0], X, known, 1e-6, term.masked_moments(1))
    _place_new_neurons(data, rec, placed[1], X, known, 1e-6, None)
    assert not torch.equal(placed[0], C0)
    np.testing.assert_allclose(placed[0].numpy(), placed[1].numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("heldout", [0.0, 0.3])
def test_streamed_windows_equal_the_data_prepared_in_memory(tmp_path, heldout):
    """Windows decoded from a zarr store into reused buffers (columns reordered by group, or
    in the store's own order when no column moves) equal the data prepared in memory, and
    reading never changes an in-memory source."""
    import zarr

    rng = np.random.default_rng(5)
    recs = []
    for name, idx, t in [("a", np.arange(0, 30), 70), ("b", np.arange(20, 40), 53)]:
        y = (rng.standard_normal((t, len(idx))) + 3.0).astype(np.float32)
        arr = zarr.create_array(
            str(tmp_path / f"{name}.zarr"), shape=y.shape, chunks=(6, len(idx)), dtype="float32"
        )
        arr[:] = y
        recs.append((RecordingInput(name, arr, idx), RecordingInput(name, y, idx), y.copy()))

    def prepared(which, budget):
        return prepare_data(
            [r[which] for r in recs],
            40,
            lags=3,
            device=torch.device("cpu"),
            heldout_fraction=heldout,
            seed=1,
            max_device_bytes=budget,
            chunk_rows=12,
            dtype=torch.float32,
        )

    mem = prepared(1, None)
    for source in (0, 1):
        streamed = prepared(source, 0)
        for rec, ref in zip(streamed.recordings, mem.recordings, strict=True):
            assert rec.data is None and ref.data is not None
            got = [
                (t0, h.clone(), y.clone())
                for t0, h, y in rec.windows(CPU, 2, span=(12, rec.n_time))
            ]
            want = list(ref.windows(CPU, 2, span=(12, rec.n_time)))
            assert [g[0] for g in got] == [w[0] for w in want]
            for (_, h, y), (_, h0, y0) in zip(got, want, strict=True):
                torch.testing.assert_close(h, h0, rtol=0, atol=1e-6)
                torch.testing.assert_close(y, y0, rtol=0, atol=1e-6)
        assert streamed.recordings[0]._identity == (heldout == 0.0)
    for _, rec, y in recs:
        np.testing.assert_array_equal(rec.activity, y)


def test_blocked_products_equal_plain_products():
    """The CPU products split into column blocks (long contraction, many columns) give the
    plain products, remainders included."""
    from poplds.stitched._products import WideSum, _blocks, mm_long

    W = 8192 * 2 * torch.get_num_threads() + 13
    assert _blocks(W) > 1
    g = torch.Generator().manual_seed(0)
    A = torch.randn(7, W, generator=g, dtype=torch.float32)
    B = torch.randn(W, 5, generator=g, dtype=torch.float32)
    exact = A.double() @ B.double()  # entries about sqrt(W) = 180: float32 sums to about 1e-3
    torch.testing.assert_close(mm_long(A, B).double(), exact, rtol=0, atol=2e-3)
    assert (mm_long(A, B).double() - exact).abs().max() <= 2 * (A @ B - exact).abs().max() + 1e-3
    slices = [slice(0, 9), slice(9, W), slice(W, W + 20)]
    acc = WideSum(4, slices, W + 20, torch.float32, CPU, flush_every=2)
    want = torch.zeros((4, W + 20), dtype=torch.float64)
    for _ in range(5):  # windows: folded in after the second and fourth, and at the end
        for k, sl in enumerate(slices):
            dZ = torch.randn(4, 3, generator=g, dtype=torch.float32)
            Y = torch.randn(3, sl.stop - sl.start, generator=g, dtype=torch.float32)
            acc.add(k, dZ, Y)
            want[:, sl] += (dZ @ Y).double()
        acc.step()
    torch.testing.assert_close(acc.result(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["float32", "float32 with missing", "int16"])
def test_column_statistics_equal_dense_numpy(kind):
    """The statistics pass (chunked rows, column ranges summed in parallel, the source's
    type read) gives every column's count, mean and sum of squares about the mean as dense
    float64 numpy does (to 1e-12), and marks the never observed and the constant columns."""
    from poplds.stitched._prepare import _column_stats

    rng = np.random.default_rng(3)
    y = rng.standard_normal((301, 57)) * 4 + 50
    if kind == "int16":
        y = rng.poisson(3.0, (301, 57))
    y = y.astype(np.int16 if kind == "int16" else np.float32)
    y[:, 4] = 9  # constant
    if "missing" in kind:
        y[rng.random(y.shape) < 0.05] = np.nan
        y[:, 7] = np.nan  # never observed
    (total, n_obs, mean, ss), never, constant = _column_stats(
        RecordingInput("r", y, np.arange(57)), rows=40
    )
    ref = y.astype(np.float64)
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(n_obs, ok.sum(0))
    seen = ok.any(0)
    want_mean = np.nansum(ref, 0) / np.maximum(ok.sum(0), 1)
    want_ss = np.nansum((ref - want_mean) ** 2, 0)
    np.testing.assert_allclose(mean[seen], want_mean[seen], rtol=1e-12)
    np.testing.assert_allclose(ss[seen], want_ss[seen], rtol=1e-12, atol=1e-9)
    assert never.tolist() == (~seen).tolist()
    assert constant[4] and constant.sum() == 1
