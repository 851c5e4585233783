"""The smoother equals dense Gaussian conditioning (float64, 1e-8), with and without missing
values, and the parallel scan equals the sequential recursion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poplds import simulate
from poplds.stitched._prepare import RecordingInput, prepare_data
from poplds.stitched.inference import scan_linear, smooth_recordings

CPU = torch.device("cpu")


def dense_posterior(A, Q, Pi, C, R, y):
    """Exact p(x[0:T] | y) of a stationary LDS by conditioning the joint Gaussian."""
    T, n = len(y), A.shape[0]
    K = np.zeros((T * n, T * n))
    for t in range(T):
        for u in range(t + 1):
            block = np.linalg.matrix_power(A, t - u) @ Pi  # cov(x[t], x[u])
            K[t * n : (t + 1) * n, u * n : (u + 1) * n] = block
            K[u * n : (u + 1) * n, t * n : (t + 1) * n] = block.T
    ok = ~np.isnan(y)
    H = np.kron(np.eye(T), C)[ok.ravel()]
    Syy = H @ K @ H.T + np.diag(np.tile(R, T)[ok.ravel()])
    gain = np.linalg.solve(Syy, H @ K).T
    mean = gain @ y[ok]
    cov = K - gain @ H @ K
    blocks = cov.reshape(T, n, T, n)
    covs = np.stack([blocks[t, :, t, :] for t in range(T)])
    cross = np.stack([blocks[t + 1, :, t, :] for t in range(T - 1)])
    return mean.reshape(T, n), covs, cross


def lds(seed, n=3, N=5):
    p = simulate.random_stitched_lds(N, n, eig_moduli=(0.8, 0.95), noise_to_signal=0.7, seed=seed)
    return p


@pytest.mark.parametrize(("T", "missing"), [(25, False), (60, False), (25, True)])
def test_smoother_matches_dense_conditioning(T, missing):
    p = lds(3)
    rng = np.random.default_rng(4)
    y, _ = simulate.simulate_stitched(p, [simulate.SimRecording("r", (0, 5), T)], seed=2)
    y = y[0]
    if missing:
        y[rng.random(y.shape) < 0.2] = np.nan
        y[5] = np.nan  # a step with nothing observed
    data = prepare_data(
        [RecordingInput("r", y, np.arange(5))],
        5,
        lags=2,
        device=CPU,
        chunk_rows=7,
        dtype=torch.float64,
    )
    blk = data.recordings[0]
    assert blk.has_missing == missing
    yc = y - np.nanmean(y, 0)  # the smoother works on centred data
    (post,) = smooth_recordings(p.A, p.Q, p.Pi, p.C, p.R, [blk], CPU, full=True)
    mean, covs, cross = dense_posterior(
        p.A, p.Q, p.Pi, p.C[blk.neurons], p.R[blk.neurons], yc[:, blk.column_order]
    )
    np.testing.assert_allclose(post.mean.numpy(), mean, atol=1e-8)
    np.testing.assert_allclose(post.cov.numpy(), covs, atol=1e-8)
    np.testing.assert_allclose(post.cross.numpy(), cross, atol=1e-8)
    np.testing.assert_allclose(post.var.numpy(), np.diagonal(covs, axis1=1, axis2=2), atol=1e-8)


def test_steady_state_path_on_a_long_recording():
    """T = 3000: the steady-state scan and the exact loop agree (the loop runs when the
    recording has a missing value; one far from the tested range barely changes it)."""
    p = lds(5, n=4, N=6)
    y, _ = simulate.simulate_stitched(p, [simulate.SimRecording("r", (0, 6), 3000)], seed=1)
    y = y[0]
    fast = prepare_data(
        [RecordingInput("r", y, np.arange(6))], 6, lags=2, device=CPU, dtype=torch.float64
    )
    y2 = y.copy()
    y2[-1, 0] = np.nan
    slow = prepare_data(
        [RecordingInput("r", y2, np.arange(6))], 6, lags=2, device=CPU, dtype=torch.float64
    )
    slow.recordings[0].mean = fast.recordings[0].mean  # same centring
    (a,) = smooth_recordings(p.A, p.Q, p.Pi, p.C, p.R, fast.recordings, CPU)
    (b,) = smooth_recordings(p.A, p.Q, p.Pi, p.C, p.R, slow.recordings, CPU)
    np.testing.assert_allclose(a.mean[:2900].numpy(), b.mean[:2900].numpy(), atol=1e-9)
    np.testing.assert_allclose(a.var[:2900].numpy(), b.var[:2900].numpy(), atol=1e-9)


def test_scan_linear_equals_recursion():
    rng = np.random.default_rng(0)
    Phi = torch.as_tensor(0.3 * rng.standard_normal((4, 4)))
    u = torch.as_tensor(rng.standard_normal((1000, 4)))
    v = torch.zeros(4, dtype=torch.float64)
    ref = []
    for t in range(1000):
        v = Phi @ v + u[t]
        ref.append(v)
    np.testing.assert_allclose(scan_linear(Phi, u).numpy(), torch.stack(ref).numpy(), atol=1e-12)
