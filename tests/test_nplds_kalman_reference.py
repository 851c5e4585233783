"""The Poisson LDS latent step: block-tridiagonal algebra against dense linear algebra, the
Gaussian case against exact conditioning and the Kalman/RTS smoother, the Poisson mode against
autograd."""

from __future__ import annotations

import numpy as np
import torch

from poplds import simulate
from poplds.nplds import _blocktri as bt
from poplds.nplds.kalman_reference import gaussian_latents

torch.set_default_dtype(torch.float64)


def dense(D, Lo):
    """(T k, T k) dense matrix of one block-tridiagonal (D (T, k, k), Lo (T-1, k, k))."""
    T, k = D.shape[0], D.shape[1]
    H = torch.zeros(T * k, T * k)
    for t in range(T):
        H[t * k : (t + 1) * k, t * k : (t + 1) * k] = D[t]
        if t < T - 1:
            H[(t + 1) * k : (t + 2) * k, t * k : (t + 1) * k] = Lo[t]
            H[t * k : (t + 1) * k, (t + 1) * k : (t + 2) * k] = Lo[t].T
    return H


def path_covariance(A, Q, V0, T):
    """(T k, T k) prior covariance of an LDS path, by stacking ``x = F e`` with
    ``F[t, s] = A^(t-s)`` and independent ``e = (x[0] - x0, w[1], ..., w[T-1])``."""
    k = A.shape[0]
    F = torch.zeros(T * k, T * k)
    noise = torch.zeros(T * k, T * k)
    for t in range(T):
        noise[t * k : (t + 1) * k, t * k : (t + 1) * k] = V0 if t == 0 else Q
        for s in range(t + 1):
            F[t * k : (t + 1) * k, s * k : (s + 1) * k] = torch.linalg.matrix_power(A, t - s)
    return F @ noise @ F.T


def random_blocktri(batch, T, k, gen):
    """An SPD block-tridiagonal matrix: L L' for a random block-bidiagonal L."""
    Ld = torch.randn(*batch, T, k, k, generator=gen).tril() + 3 * torch.eye(k)
    Le = torch.randn(*batch, T - 1, k, k, generator=gen)
    D = Ld @ Ld.mT
    D[..., 1:, :, :] += Le @ Le.mT
    Lo = Le @ Ld[..., :-1, :, :].mT
    return D, Lo


def test_blocktri_against_dense():
    gen = torch.Generator().manual_seed(0)
    D, Lo = random_blocktri((3,), 6, 3, gen)
    b = torch.randn(3, 6, 3, generator=gen)
    fac = bt.cholesky(D, Lo)
    x = bt.solve(fac, b)
    diag, off = bt.inverse_blocks(fac)
    for r in range(3):
        H = dense(D[r], Lo[r])
        Hinv = torch.linalg.inv(H)
        np.testing.assert_allclose(
            x[r].reshape(-1), torch.linalg.solve(H, b[r].reshape(-1)), atol=1e-10
        )
        blocks = Hinv.reshape(6, 3, 6, 3)
        for t in range(6):
            np.testing.assert_allclose(diag[r, t], blocks[t, :, t, :], atol=1e-10)
            if t < 5:
                np.testing.assert_allclose(off[r, t], blocks[t + 1, :, t, :], atol=1e-10)
        np.testing.assert_allclose(bt.logdet(fac)[r], torch.logdet(H), atol=1e-10)
        np.testing.assert_allclose(
            bt.matvec(D[r], Lo[r], b[r]).reshape(-1), H @ b[r].reshape(-1), atol=1e-10
        )


def model(seed=0, k=3, N=5):
    p = simulate.random_stitched_lds(N, k, eig_moduli=(0.8, 0.95), noise_to_signal=0.7, seed=seed)
    return {name: torch.as_tensor(v) for name, v in p._asdict().items() if v is not None}


def test_gaussian_step_equals_exact_conditioning():
    """General x0, V0 and inputs: covariance-form conditioning of the joint Gaussian."""
    m = model()
    gen = torch.Generator().manual_seed(1)
    R, T, k, N = 2, 12, 3, 5
    x0 = torch.randn(k, generator=gen)
    V0 = 0.5 * torch.eye(k) + 0.1
    b = 0.3 * torch.randn(R, T, k, generator=gen)
    y = torch.randn(R, T, N, generator=gen)
    off = torch.randn(R, N, generator=gen)
    post = gaussian_latents(y, m["C"], m["R"], off, m["A"], m["Q"], x0, V0, b)
    K = path_covariance(m["A"], m["Q"], V0, T)  # prior covariance of the path
    H = torch.kron(torch.eye(T), m["C"])
    for r in range(R):
        mu = torch.empty(T, k)
        mu[0] = x0
        for t in range(1, T):
            mu[t] = m["A"] @ mu[t - 1] + b[r, t]
        S = H @ K @ H.T + torch.diag(m["R"].repeat(T))
        gain = K @ H.T @ torch.linalg.inv(S)
        mean = mu.reshape(-1) + gain @ ((y[r] - off[r]).reshape(-1) - H @ mu.reshape(-1))
        cov = (K - gain @ H @ K).reshape(T, k, T, k)
        np.testing.assert_allclose(post.mean[r].reshape(-1), mean, atol=1e-8)
        for t in range(T):
            np.testing.assert_allclose(post.cov[r, t], cov[t, :, t, :], atol=1e-8)
            if t < T - 1:
                np.testing.assert_allclose(post.cross[r, t], cov[t + 1, :, t, :], atol=1e-8)


def test_gaussian_step_equals_the_kalman_smoother():
    """Stationary start (x0 = 0, V0 = Pi): the stitched LDS's Kalman/RTS smoother, an
    independent algorithm, gives the same means, covariances and cross-covariances."""
    from poplds.stitched import RecordingInput, prepare_data, smooth_recordings

    m = model(seed=2)
    p = simulate.random_stitched_lds(5, 3, eig_moduli=(0.8, 0.95), noise_to_signal=0.7, seed=2)
    (y,), _ = simulate.simulate_stitched(p, [simulate.SimRecording("r", (0, 5), 40)], seed=3)
    data = prepare_data(
        [RecordingInput("r", y, np.arange(5))],
        5,
        lags=2,
        device=torch.device("cpu"),
        dtype=torch.float64,
    )
    blk = data.recordings[0]
    (ks,) = smooth_recordings(p.A, p.Q, p.Pi, p.C, p.R, [blk], torch.device("cpu"), full=True)
    yc = torch.as_tensor((y - y.mean(0))[:, blk.column_order])[None]
    C = m["C"][torch.as_tensor(blk.neurons)]
    post = gaussian_latents(
        yc,
        C,
        m["R"][torch.as_tensor(blk.neurons)],
        torch.zeros(1, 5),
        m["A"],
        m["Q"],
        torch.zeros(3),
        m["Pi"],
    )
    np.testing.assert_allclose(post.mean[0], ks.mean, atol=1e-8)
    np.testing.assert_allclose(post.cov[0], ks.cov, atol=1e-8)
    np.testing.assert_allclose(post.cross[0], ks.cross, atol=1e-8)
