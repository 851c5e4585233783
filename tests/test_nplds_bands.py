"""The drift band with the GP hyperparameters integrated out, and the loadings' covariance."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from poplds.nplds import bands, model, vi
from poplds.simulate import simulate_poisson_trials

tt = torch.as_tensor


def _kernel(a: np.ndarray, b: np.ndarray, s2: float, tau: float, nugget: bool) -> np.ndarray:
    K = s2 * np.exp(-0.5 * (a[:, None] - b[None, :]) ** 2 / tau**2)
    return K + s2 * model.NUGGET * np.eye(len(a)) if nugget else K


def test_gp_mixture_is_the_dense_quadrature(monkeypatch):
    """Against dense Gaussian algebra per grid point (numpy; the evidence from scipy's
    multivariate normal of the pseudo-observations z = b / s of the trials with s > 0), mixed
    with weights evidence x prior: means and variances at training and held-out trial
    numbers agree to 1e-9, and so do the variances of h[r] less its mean over all trials
    (the drift the figures show, d absorbing its mean); the same in batches of 3 grid
    points (as for many trials)."""
    rng = np.random.default_rng(3)
    n = np.sort(rng.choice(40, size=12, replace=False)).astype(float)
    n_test = np.array([3.5, 20.0, 45.0])
    s = rng.uniform(0.5, 4.0, size=12)
    s[[2, 7]] = 0.0  # trials whose spikes say nothing about h
    b = rng.normal(size=12) * s
    log_sd = np.log(np.array([0.1, 0.4, 1.0, 2.5]))
    log_tau = np.log(np.array([2.0, 6.0, 15.0]))
    prior = bands.half_cauchy(1.5)
    mean, var, var_c, s2_top, tau_top = bands.gp_mixture(
        tt(n), tt(n_test), tt(b), tt(s), tt(log_sd), tt(log_tau), prior
    )
    obs = s > 0
    n_all = len(n) + len(n_test)
    P = np.eye(n_all) - 1.0 / n_all  # centring over all trials
    logw, means, variances, centred, points = [], [], [], [], []
    for lt in log_tau:
        for ls in log_sd:
            s2, tau = math.exp(2 * ls), math.exp(lt)
            K = _kernel(n, n, s2, tau, True)
            z = b[obs] / s[obs]
            ev = multivariate_normal(np.zeros(obs.sum()), K[np.ix_(obs, obs)] + np.diag(1 / s[obs]))
            logw.append(ev.logpdf(z) + float(prior(torch.tensor(ls))))
            S = np.linalg.inv(np.linalg.inv(K) + np.diag(s))
            m = S @ b
            Ks = _kernel(n_test, n, s2, tau, False)
            Ki = np.linalg.inv(K)
            ms = Ks @ Ki @ m  # the GP conditional mixed over q(h)
            vs = (
                s2 * (1 + model.NUGGET) - np.diag(Ks @ Ki @ Ks.T) + np.diag(Ks @ Ki @ S @ Ki @ Ks.T)
            )
            # the whole posterior covariance over training then held-out trial numbers
            Ka = np.vstack([np.eye(len(n)), Ks @ Ki])  # (R + R*, R): h_all's mean map
            Kss = _kernel(n_test, n_test, s2, tau, True)
            full = Ka @ S @ Ka.T
            full[len(n) :, len(n) :] += Kss - Ks @ Ki @ Ks.T
            np.testing.assert_allclose(np.diag(full)[len(n) :], vs, rtol=1e-9)
            mall = np.concatenate([m, ms])
            means.append(mall)
            variances.append(np.concatenate([np.diag(S), vs]))
            centred.append(np.diag(P @ full @ P) + (P @ mall) ** 2)
            points.append((s2, tau))
    w = np.exp(np.array(logw) - max(logw))
    w /= w.sum()
    M, V = np.array(means), np.array(variances)
    ref_mean = w @ M
    ref_var = w @ (V + M**2) - ref_mean**2
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(var.numpy(), ref_var, rtol=1e-7, atol=1e-9)
    ref_centred = w @ np.array(centred) - (P @ ref_mean) ** 2  # Var(h[r] - hbar)
    np.testing.assert_allclose(var_c.numpy(), ref_centred, rtol=1e-7, atol=1e-9)
    assert (ref_centred < ref_var).mean() > 0.5  # centring removes the common part
    assert (float(s2_top), float(tau_top)) == pytest.approx(points[int(np.argmax(w))], rel=1e-12)
    monkeypatch.setattr(bands, "MAX_BATCH_ENTRIES", 3 * 12 * 12)
    batched = bands.gp_mixture(tt(n), tt(n_test), tt(b), tt(s), tt(log_sd), tt(log_tau), prior)
    for got, want in zip(batched, (mean, var, var_c, s2_top, tau_top), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def _small_fit():
    tr = simulate_poisson_trials(
        n_neurons=8, latent_dim=2, n_trials=12, n_bins=30, base_rate_hz=20.0, seed=4
    )
    y = tr.counts.astype(float)
    fit = vi.fit(y, None, 2, offset=True, max_iter=8, progress_every=0)
    return fit, model.TrialData(tt(y), tt(np.arange(12.0)))


def test_loading_covariance_is_the_inverse_hessian_of_the_bound():
    """Against torch.autograd: the Hessian of the bound in (c_i, d_i) at fixed q, inverted, its
    c block, for every neuron of a small fit (rtol 1e-8)."""
    fit, data = _small_fit()
    p, st = fit.params, fit.state
    got = bands.loading_covariance(data, p, st)
    for i in range(p.C.shape[0]):

        def bound(theta, i=i):
            C = p.C.clone()
            d = p.d.clone()
            C[i], d[i] = theta[:-1], theta[-1]
            mean, log_lam = model.expected_log_rate(replace(p, C=C, d=d), st)
            return model.expected_loglik(data, mean, log_lam).sum()

        theta = torch.cat([p.C[i], p.d[i : i + 1]])
        H = torch.autograd.functional.hessian(bound, theta)
        ref = torch.linalg.inv(-H)[:-1, :-1]
        torch.testing.assert_close(got[i], ref, rtol=1e-8, atol=1e-12)
