"""The deterministic start of an N-PLDS fit: parameters from the Poisson moment matching of
log-rate covariances, a few E-steps, each trial's mean latent moved into h, and the latent
axes turned to the principal axes."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from .._errors import InputError
from .._linalg import psd_project, sym
from . import model
from ._numerics import site_covariance
from .estep import estep, paths_cov, step_paths_cov, step_paths_mean
from .model import GPPriors, PLDSParams, TrialData, VIState


def _moment_covariances(
    y: torch.Tensor, mask_frac: float = 1e-3, locked: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean counts mu (N,) and log-rate covariances at lags 0 and 1 (N, N) from the counts'
    moments under the Poisson model with Gaussian log-rates (Macke et al. 2011)::

        Sigma_0 = log(1 + (Cov(y_t) - diag(mu)) / (mu mu')),
        Sigma_1 = log(1 + Cov(y_{t+1}, y_t) / (mu mu'))

    pooled over trials and bins (missing bins, NaN, left out of each sum and its count);
    arguments of the log are floored at ``mask_frac``. With ``locked`` the covariances are
    those around each bin's mean over trials (the PSTH, which the time-in-trial offset
    carries), so that the latents start on the trial-to-trial variability."""
    R, T, N = y.shape
    o = (~torch.isnan(y)).to(y.dtype)  # missing bins (NaN) are left out of every moment
    y = torch.nan_to_num(y, nan=0.0)
    mu = ((y * o).sum((0, 1)) / o.sum((0, 1)).clamp(min=1)).clamp(min=1e-3 / T)
    centre = mu
    if locked:
        centre = (y * o).sum(0) / o.sum(0).clamp(min=1)  # (T, N) the PSTH
    yc = ((y - centre) * o).reshape(R * T, N)
    of = o.reshape(R * T, N)
    cov0 = yc.T @ yc / (of.T @ of).clamp(min=1) - torch.diag(mu)
    a, b = yc.reshape(R, T, N)[:, 1:].reshape(-1, N), yc.reshape(R, T, N)[:, :-1].reshape(-1, N)
    oa, ob = o[:, 1:].reshape(-1, N), o[:, :-1].reshape(-1, N)
    cov1 = a.T @ b / (oa.T @ ob).clamp(min=1)
    mm = mu[:, None] * mu[None, :]
    sig0 = torch.log(torch.clamp(1 + cov0 / mm, min=mask_frac))
    sig1 = torch.log(torch.clamp(1 + cov1 / mm, min=mask_frac))
    # sub-Poisson variance (a negative corrected variance) means no detectable rate variance
    sig0.diagonal().clamp_(min=0)
    return mu, sym(sig0), sig1


def initial_params(
    y: np.ndarray | torch.Tensor,
    n: np.ndarray,
    k: int,
    *,
    drift: bool,
    dynamics_drift: bool = False,
    n_inputs: int = 0,
    offset: bool = False,
    neuron_drift: bool = False,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> PLDSParams:
    """Deterministic start by moment matching of the Poisson log-rate covariances.

    With the latents' stationary covariance set to I: ``C = U_k Lambda_k^(1/2)`` from the
    top-k eigenpairs of Sigma_0 (:func:`_moment_covariances`), ``d = log mu - diag(C C') / 2``,
    ``A = C^+ Sigma_1 C^+'`` (spectral radius capped at 0.99), ``Q = I - A A'``, ``x0 = 0``,
    ``V0 = I``. GP variances start at a tenth of the latent variance, length-scales at a tenth
    of the span of trial numbers; the dynamics variant starts with ``A1 = 0.05 A`` (h and g
    start from the data in :func:`initial_state`). With ``offset`` the covariances are taken
    around the PSTH, ``f_mean`` starts at the log of the PSTH (Gaussian-smoothed over 2 bins)
    over the mean rate, each ``sf2_i`` at its variance over bins, ``lf`` at T / 20 bins (at least 1)
    and ``f_cov`` at the site posterior with the PSTH's counts as precisions. With
    ``neuron_drift`` each neuron's drift variance starts at 0.01 and its length-scale at a
    tenth of the span (q(e) starts at its prior in :func:`initial_state`).
    """
    R, T, N = y.shape
    if k > N:
        raise InputError("latent_dim", f"latent dimension {k} exceeds the {N} neurons")
    yt = torch.as_tensor(y, dtype=dtype, device=device)
    mu, sig0, sig1 = _moment_covariances(yt, locked=offset)
    ev, U = torch.linalg.eigh(sig0)
    ev, U = ev.flip(0)[:k], U.flip(1)[:, :k]
    C = U * torch.sqrt(torch.clamp(ev, min=1e-3 * ev[0].clamp(min=1e-6)))
    d = torch.log(mu) - 0.5 * (C**2).sum(1)
    Cp = torch.linalg.pinv(C)
    A = Cp @ sig1 @ Cp.T
    rad = torch.linalg.eigvals(A).abs().max()
    if rad > 0.99:
        A = A * (0.99 / rad)
    eye = torch.eye(k, dtype=dtype, device=device)
    Q = eye - A @ A.T
    Q = psd_project(Q, 1e-2)
    p = PLDSParams(C=C, d=d, A=A, Q=Q, x0=torch.zeros(k, dtype=dtype, device=device), V0=eye)
    span = max(float(np.ptp(n)), 1.0)
    if n_inputs:
        p.B = torch.zeros((k, n_inputs), dtype=dtype, device=device)
    if drift:
        p.log_sigma2 = torch.full((k,), math.log(0.1), dtype=dtype, device=device)
        p.log_tau = torch.full((k,), math.log(max(span / 10.0, 1.0)), dtype=dtype, device=device)
    if offset:
        _initial_offset(p, yt, mu)
    if neuron_drift:
        p.log_se2 = torch.full((N,), math.log(1e-2), dtype=dtype, device=device)
        p.log_le = torch.tensor(math.log(max(span / 10.0, 1.0)), dtype=dtype, device=device)
    if dynamics_drift:
        p.A1 = 0.05 * A
        p.log_tau_g = torch.tensor(math.log(max(span / 10.0, 1.0)), dtype=dtype, device=device)
    return p


def _initial_offset(p: PLDSParams, y: torch.Tensor, mu: torch.Tensor) -> None:
    """Set the offset's start on ``p`` (:func:`initial_params`): y (R, T, N) with NaN, mu (N,)."""
    from scipy.ndimage import gaussian_filter1d

    R, T, N = y.shape
    o = ~torch.isnan(y)
    counts = torch.where(o, y, torch.zeros_like(y)).sum(0)  # (T, N)
    seen = o.sum(0).to(y.dtype)
    psth = (counts + 0.5 * mu) / (seen + 0.5)  # a half-trial of the mean rate as a floor
    smooth = gaussian_filter1d(psth.cpu().numpy(), 2.0, axis=0, mode="nearest")
    f = torch.log(torch.as_tensor(smooth, dtype=y.dtype, device=y.device) / mu)
    f = f - f.mean(0)
    p.f_mean = f
    p.log_sf2 = torch.log(f.var(0).clamp(min=1e-2))
    p.log_lf = torch.log(torch.tensor(max(T / 20.0, 1.0), dtype=y.dtype, device=y.device))
    p.f_cov = site_covariance(p.offset_kernel(), (seen * mu).T)


def rotate(p: PLDSParams, st: VIState, V: torch.Tensor) -> tuple[PLDSParams, VIState]:
    """Change latent coordinates ``x -> V' x`` for orthogonal V (k, k): the path model, the
    paths' q and the loadings transform together (``C -> C V``), so every rate is unchanged."""
    Vt = V.T
    q = replace(
        p,
        C=p.C @ V,
        A=Vt @ p.A @ V,
        Q=Vt @ p.Q @ V,
        x0=Vt @ p.x0,
        V0=Vt @ p.V0 @ V,
        B=None if p.B is None else Vt @ p.B,
        A1=None if p.A1 is None else Vt @ p.A1 @ V,
    )
    st = replace(st, m=st.m @ V, S=Vt @ st.S @ V, cross=Vt @ st.cross @ V, hm=st.hm @ V)
    return q, st


def initial_state(
    data: TrialData, p: PLDSParams, gp: GPPriors, steps: int = 3, learn: bool = True
) -> tuple[PLDSParams, VIState]:
    """A valid q to start from: paths at the prior mean, ``steps`` Newton and covariance
    steps with h = 0; then (non-stationary model) each trial's mean latent moves from the
    path into h, the latent axes are rotated to the principal axes of those means (the
    per-dimension GP prior is not rotation invariant, and EM turns the axes only slowly),
    and ``steps`` full E-steps follow. Returns the rotated parameters and q.

    With ``learn=False`` (inference on held-out trials with fixed parameters) q(h) starts
    at its prior (the GP conditional) and nothing is rotated."""
    R, T, N = data.shape
    k = p.C.shape[1]
    dt, dev = p.A.dtype, p.A.device
    zeros = lambda *shape: torch.zeros(shape, dtype=dt, device=dev)  # noqa: E731
    gm = gS = None
    if gp.gK is not None:
        gm, gS = gp.gmu.clone(), gp.gK.clone()
    mean, _ = model.prior_path_moments(p, R, T, data.u)
    hm, hS = zeros(R, k), zeros(k, R, R)
    if gp.hK is not None and not learn:
        hm, hS = gp.hmu.T.clone(), gp.hK.clone()
    em = eS = None
    if p.neuron_drift:
        if learn or gp.eK is None:
            em = zeros(R, N)
            eS = torch.exp(p.log_se2)[:, None, None] * p.neuron_drift_unit_kernel(data.n)
        else:
            em, eS = gp.emu.T.clone(), gp.eK.clone()
    st = VIState(
        em=em,
        eS=eS,
        m=mean,
        S=zeros(R, T, k, k),
        cross=zeros(R, T - 1, k, k),
        logdet_s=zeros(R),
        w=zeros(R, T, N),
        hm=hm,
        hS=hS,
        gm=gm,
        gS=gS,
    )
    prior = model.path_prior(p, R, T, data.u, *model.g_moments(st))
    _, log_lam = model.expected_log_rate(p, st)
    w = torch.exp(log_lam) * data.weight
    S, cross, logdet_s = paths_cov(prior, p.C, w)
    st = replace(st, S=S, cross=cross, logdet_s=logdet_s, w=w)
    for _ in range(steps):
        st = step_paths_mean(data, p, st, prior)
        st = step_paths_cov(data, p, st, prior)
    if gp.hK is not None and not learn:
        for _ in range(steps):
            st = estep(data, p, st, gp)
    elif gp.hK is not None:
        h = st.m.mean(1)
        st = replace(st, m=st.m - h[:, None, :], hm=h, hS=0.5 * gp.hK.clone())
        _, V = torch.linalg.eigh(h.T @ h)
        p, st = rotate(p, st, V.flip(1))
        for _ in range(steps):
            st = estep(data, p, st, gp)
    return p, st
