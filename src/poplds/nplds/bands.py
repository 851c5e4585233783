"""Drift bands that hold: the modulator's posterior with its GP hyperparameters integrated out.

The fit estimates each drift dimension's variance ``sigma2_j`` and length-scale ``tau_j`` by
maximising the bound (type-II maximum likelihood). Over tens of trials a drift of length-scale
15 trials has a handful of independent values, so those estimates are poor: a dimension's
variance often goes to zero, its length-scale too long, and a band that takes them as known
is too narrow (on the demo's design it covers 81 % of the true modulator on average over 20
simulations, 40 % at worst). Here they are integrated out.

1. **What the spikes say about h, per trial.** Under the Laplace approximation of the joint
   posterior of the paths and h (:func:`.estep.h_schur`: each trial's path eliminated), the
   spikes give ``h[r]`` (all k dimensions) a Gaussian likelihood of precision ``Schur_r``
   (k x k) and centre ``z_r``, the Newton step from q's mean m:
   ``z_r = m_r + Schur_r^-1 g_r`` with ``g_r = sum_t C' (y[r,t] - E[rate[r,t]])`` the
   gradient of the expected log likelihood in h[r] (the paths' own gradients vanish at q's
   optimum). Dimension j then sees the site ``N(z_jr; h_jr, [Schur_r^-1]_jj)``: its
   *marginal* precision ``s_jr = 1 / [Schur_r^-1]_jj``, the other dimensions unknown too
   (their diagonal ``Schur_r[j, j]``, the others held at q's means, is too confident where
   loadings are correlated), and ``b_jr = s_jr z_jr``. At q's fixed point ``g = K_hat^-1 m``;
   computing g directly needs no inverse of a kernel whose variance may have gone to zero.
2. **Each hyperparameter value's posterior of h** is then GP regression with known
   heteroscedastic noise: with ``W = diag(s_j)``, ``B = I + W^1/2 K W^1/2``,
   ``m_theta = K W^1/2 B^-1 W^-1/2 b``, ``S_theta = K - K W^1/2 B^-1 W^1/2 K``, and at the
   held-out trial numbers the GP predictive ``K_* W^1/2 B^-1 W^-1/2 b`` and
   ``K_** - K_* W^1/2 B^-1 W^1/2 K_*'``. Its evidence is
   ``log p(z | theta) = -1/2 b~' B^-1 b~ - 1/2 log|B| + const``, ``b~ = W^-1/2 b``.
3. **Hyperprior and quadrature.** ``log tau_j`` uniform between the fit's lower bound (what
   "slow" means) and twice the span of the trial numbers (longer ones are all near-linear
   trends over the recording); the standard deviation ``sigma_j`` half-Cauchy with scale
   ``1 / rms_i |c_ij|``: a drift of one e-fold in a typical neuron's rate is its scale, and its
   density vanishes at zero, so a dimension the data barely support keeps some width. A grid
   of ``N_SD x N_TAU`` points, uniform in ``(log sigma_j, log tau_j)``, weighted by
   evidence x prior (with the Jacobian of the log coordinates).
4. **The band** per dimension is the mixture's mean and variance,
   ``E[h] = sum_g w_g m_g``, ``Var[h] = sum_g w_g (S_g + m_g^2) - E[h]^2``, and the variance
   of the centred ``h[r] - hbar`` (hbar the mean over all R + R* trials) the same way with
   ``P S_g P`` and ``P m_g`` (``P = I - 11'/(R + R*)``): the baseline d absorbs the drift's
   mean, so figures show the centred drift, and its band is that variance's, which leaves
   out the uncertainty of a common level that no trial can tell from d.

Cost: ``N_SD x N_TAU`` factors of an R x R matrix per dimension, in batches of at most
``MAX_BATCH_ENTRIES`` entries (18 s per dimension at R = 1000 trials on 2 cores, milliseconds
at the demo's 48). The dimensions' GP priors are treated one at a time, as q(h) does; the sites
couple them through the marginal precisions of step 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .estep import h_schur
from .model import (
    TAU_RANGE,
    PLDSParams,
    TrialData,
    VIState,
    expected_log_rate,
    se_cross_kernel,
    se_kernel,
)

#: Grid points per dimension: standard deviations (log-spaced from 1e-2 to 10 times the
#: half-Cauchy's scale) and length-scales (log-spaced over the prior's range).
N_SD, N_TAU = 24, 12
#: Longest length-scale of the hyperprior, in spans of the trial numbers.
TAU_MAX_SPANS = 2.0
#: Most entries of the (grid points, R, R) arrays formed at once (about 160 MB each).
MAX_BATCH_ENTRIES = 2e7


@dataclass
class DriftBand:
    """The modulator's posterior with the hyperparameters integrated out: mean, var (R + R*, k)
    over the training trials then the held-out ones."""

    mean: torch.Tensor
    var: torch.Tensor
    #: variance of ``h[r] - hbar`` (hbar: the mean over all R + R* trials, which the
    #: baseline d absorbs), the band of the centred drift that figures show
    var_centred: torch.Tensor


def drift_band(
    data: TrialData,
    p: PLDSParams,
    st: VIState,
    n_test: torch.Tensor,
    min_tau: float = TAU_RANGE[0],
) -> DriftBand:
    """h's posterior with its GP hyperparameters integrated out (module docstring).

    data, p, st: the training trials, fitted parameters and q; n_test: (R*,) held-out trial
    numbers (may be empty); min_tau: the fit's lower bound on the length-scales, in trials."""
    n = data.n
    dt, dev = n.dtype, n.device
    span = float((n.max() - n.min()).clamp(min=1.0))
    hi_tau = max(TAU_MAX_SPANS * span, 2 * min_tau)
    log_tau = torch.linspace(math.log(min_tau), math.log(hi_tau), N_TAU, dtype=dt, device=dev)
    _, log_lam = expected_log_rate(p, st)
    grad = ((data.y - torch.exp(log_lam)) * data.weight).sum(1) @ p.C  # (R, k)
    # the joint Newton step over all k dimensions of each trial, and each dimension's
    # marginal precision (the other dimensions unknown too, not held at q's means)
    cov = torch.linalg.pinv(h_schur(data, p, st), hermitian=True)  # (R, k, k)
    z = st.hm + (cov @ grad[..., None])[..., 0]  # (R, k)
    var_site = torch.diagonal(cov, dim1=-2, dim2=-1).T  # (k, R)
    schur = torch.where(var_site > 0, 1.0 / var_site.clamp(min=1e-300), torch.zeros_like(var_site))
    b = schur * z.T  # (k, R)
    out = []
    for j in range(schur.shape[0]):
        scale = float(1.0 / p.C[:, j].pow(2).mean().sqrt().clamp(min=1e-12))
        log_sd = torch.linspace(math.log(1e-2 * scale), math.log(10 * scale), N_SD, dtype=dt)
        log_sd = log_sd.to(dev)
        out.append(gp_mixture(n, n_test, b[j], schur[j], log_sd, log_tau, half_cauchy(scale)))
    return DriftBand(*(torch.stack([o[i] for o in out]).T for i in range(3)))


def half_cauchy(scale: float):
    """Log density of ``log sigma`` (the Jacobian included) when ``sigma ~ half-Cauchy(0,
    scale)``: a function of log sigma."""

    def log_density(log_sd: torch.Tensor) -> torch.Tensor:
        sd = torch.exp(log_sd)
        return math.log(2 / (math.pi * scale)) - torch.log1p((sd / scale) ** 2) + log_sd

    return log_density


def gp_mixture(
    n: torch.Tensor,
    n_test: torch.Tensor,
    b: torch.Tensor,
    s: torch.Tensor,
    log_sd: torch.Tensor,
    log_tau: torch.Tensor,
    log_prior_sd,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior of one GP ``h ~ GP(0, sigma^2 k_tau)`` over trial numbers n (R,) from
    Gaussian site terms ``exp(b h - s h^2 / 2)`` per trial (b, s (R,), s >= 0), with
    ``(log sigma, log tau)`` integrated over the grid ``log_sd x log_tau`` (uniform in both;
    the prior of log tau uniform, of log sigma ``log_prior_sd``).

    Per grid point, with ``W = diag(s)``, ``B = I + W^1/2 K W^1/2``, ``b~ = W^-1/2 b``:
    ``m = K W^1/2 B^-1 b~``, ``var = diag(K - K W^1/2 B^-1 W^1/2 K)``, at n_test the same with
    ``K_*``, and the evidence ``-1/2 b~' B^-1 b~ - 1/2 log|B|`` (up to a constant). Returns
    the mixture's mean, variance and variance of ``h[r] - hbar`` (hbar the mean over all
    R + R* trial numbers; per grid point ``diag(P S P)`` from the posterior covariance's row
    sums ``S 1 = K 1 - K_a W^1/2 B^-1 W^1/2 K_a' 1``), each (R + R*,) over n then n_test,
    and the grid point of largest weight (sigma^2, tau)."""
    R, G = n.shape[0], log_sd.shape[0]
    dt, dev = n.dtype, n.device
    sw = s.clamp(min=0).sqrt()
    b_t = torch.where(sw > 0, b / sw.clamp(min=1e-300), torch.zeros_like(b))
    s2 = torch.exp(2 * log_sd)  # (G,)
    eye = torch.eye(R, dtype=dt, device=dev)
    one = n.new_ones(1)
    n_all = R + n_test.shape[0]
    logw, mix_m, mix_v, mix_c = [], [], [], []
    chunk = max(1, int(MAX_BATCH_ENTRIES // max(R * R, 1)))  # grid points per batch
    for lt in log_tau:
        tau = torch.exp(lt).reshape(1)
        K1 = se_kernel(n, one, tau)[0]  # (R, R) at unit variance
        Ks1 = se_cross_kernel(n_test, n, one, tau)[0]  # (R*, R)
        Kss1 = se_kernel(n_test, one, tau)[0]  # (R*, R*)
        kss1 = torch.diagonal(Kss1)
        # row sums of the prior covariance over all R + R* trial numbers, at unit variance
        K1_rows = torch.cat([K1.sum(1) + Ks1.sum(0), Ks1.sum(1) + Kss1.sum(1)])
        parts = []
        for g0 in range(0, G, chunk):
            v2 = s2[g0 : g0 + chunk]
            K, Ks = v2[:, None, None] * K1, v2[:, None, None] * Ks1  # (g, R, R), (g, R*, R)
            KW, KsW = K * sw, Ks * sw
            LB = torch.linalg.cholesky(eye + sw[:, None] * KW)
            a = torch.cholesky_solve(b_t.expand(len(v2), R)[..., None], LB)[..., 0]
            ev = -0.5 * (b_t * a).sum(-1) - torch.log(torch.diagonal(LB, dim1=-2, dim2=-1)).sum(-1)
            V, Vs = torch.cholesky_solve(KW.mT, LB), torch.cholesky_solve(KsW.mT, LB)
            m = torch.cat([(KW @ a[..., None])[..., 0], (KsW @ a[..., None])[..., 0]], -1)
            var_train = torch.diagonal(K, dim1=-2, dim2=-1) - (KW * V.mT).sum(-1)
            var = torch.cat([var_train, v2[:, None] * kss1 - (KsW * Vs.mT).sum(-1)], -1)
            # S 1: the posterior covariance's row sums, K 1 - K_a W^1/2 B^-1 W^1/2 K_a' 1
            KaW = torch.cat([KW, KsW], -2)  # (g, R + R*, R)
            u = torch.cholesky_solve(KaW.sum(-2)[..., None], LB)  # (g, R, 1)
            rows = v2[:, None] * K1_rows - (KaW @ u)[..., 0]
            # Var(h[r] - mean of h) = S_rr - 2 (S 1)_r / n + 1'S1 / n^2, before mixing
            cen = var - 2 * rows / n_all + rows.sum(-1, keepdim=True) / n_all**2
            parts.append((ev, m, var.clamp(min=0), cen))
        ev, m, var, cen = (torch.cat(x) for x in zip(*parts, strict=True))
        logw.append(ev + log_prior_sd(log_sd))
        mix_m.append(m)
        mix_v.append(var)
        mix_c.append(cen)
    w = torch.softmax(torch.stack(logw).reshape(-1), 0)  # (G_tau * G_sd,)
    M = torch.stack(mix_m).reshape(w.shape[0], -1)
    mean = w @ M
    var = (w @ (torch.stack(mix_v).reshape(w.shape[0], -1) + M**2) - mean**2).clamp(min=0)
    # the same for the centred h[r] - hbar: the grid points' means centred, then mixed
    Mc = M - M.mean(-1, keepdim=True)
    cen = w @ (torch.stack(mix_c).reshape(w.shape[0], -1) + Mc**2) - (mean - mean.mean()) ** 2
    top = int(torch.argmax(w))
    return mean, var, cen.clamp(min=0), s2[top % G], torch.exp(log_tau[top // G])


def loading_covariance(data: TrialData, p: PLDSParams, st: VIState) -> torch.Tensor:
    """(N, k, k) covariance of each neuron's loading c_i under the Laplace approximation of the
    bound in ``(c_i, d_i)`` at fixed q: the inverse of its negative Hessian,
    ``H_i = sum_{r,t} rate [(mu + Sig c_i)(mu + Sig c_i)' + Sig]`` in c_i, ``sum rate (mu +
    Sig c_i)`` between c_i and d_i, ``sum rate`` in d_i (``mu = m[r,t] + hm[r]``,
    ``Sig = S[r,t] + diag hv[r]``, rate the expected rate under q, observed bins only), with
    d_i marginalised out.

    A band for ``c_i'h[r]`` that holds C fixed leaves out what the loadings' own error adds,
    ``(h[r] - hbar)' Cov(c_i) (h[r] - hbar)``: on the demo's design about a quarter of the
    band-miss error lies outside C's column space."""
    _, log_lam = expected_log_rate(p, st)
    lam = torch.exp(log_lam) * data.weight  # (R, T, N)
    R, T, N = lam.shape
    k = p.C.shape[1]
    mu = st.m + st.hm[:, None, :]  # (R, T, k)
    Sig = st.S + torch.diag_embed(st.hv)[:, None]  # (R, T, k, k)
    H = torch.zeros(N, k + 1, k + 1, dtype=mu.dtype, device=mu.device)
    chunk = max(1, int(2e7 // max(R * T * k, 1)))
    for i0 in range(0, N, chunk):
        sl = slice(i0, i0 + chunk)
        u = mu[:, :, None, :] + torch.einsum("rtab,nb->rtna", Sig, p.C[sl])  # (R, T, n, k)
        H[sl, :k, :k] = torch.einsum("rtn,rtna,rtnb->nab", lam[..., sl], u, u)
        H[sl, :k, :k] += torch.einsum("rtn,rtab->nab", lam[..., sl], Sig)
        H[sl, :k, k] = torch.einsum("rtn,rtna->na", lam[..., sl], u)
    H[:, k, :k] = H[:, :k, k]
    H[:, k, k] = lam.sum((0, 1))
    ridge = 1e-12 * torch.diagonal(H, dim1=-2, dim2=-1).mean(-1).clamp(min=1e-300)
    eye = torch.eye(k + 1, dtype=mu.dtype, device=mu.device)
    return torch.linalg.inv(H + ridge[:, None, None] * eye)[:, :k, :k]


def shift_band(
    h_mean: np.ndarray, h_var: np.ndarray, C: np.ndarray, C_cov: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The log-rate drift ``c_i' h[r]`` (R, N) and its standard deviation (R, N) from h's
    mean and variances h_mean, h_var (R, k) (dimensions independent, as in q(h) and
    :class:`DriftBand`) and loadings C (N, k); with C_cov (N, k, k) (:func:`loading_covariance`)
    the loadings' own error ``(h[r] - hbar)' Cov(c_i) (h[r] - hbar)`` is added (hbar: the
    mean over trials, which the baseline d absorbs)."""
    var = h_var @ (C**2).T
    if C_cov is not None:
        hc = h_mean - h_mean.mean(0)
        var = var + np.einsum("ra,iab,rb->ri", hc, C_cov, hc)
    return h_mean @ C.T, np.sqrt(var)
