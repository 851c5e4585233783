"""E-steps of the N-PLDS variational EM: each q factor's update given the parameters.

Paths' means by a damped Newton step (block-tridiagonal Hessian, batched over trials), the
paths' covariances by the fixed point ``w <- lambda``, each q(h[:, j]) by a damped
Newton/fixed-point step, and the exact q(g). Every non-exact step is halved per trial or
dimension until the bound does not fall (:mod:`poplds.nplds.vi` has the bound)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .._linalg import sym
from . import _blocktri as bt
from ._numerics import (
    conjugate_gradients,
    gaussian_kl,
    halve_until,
    kernel_solve,
    site_covariance,
    skipped,
    weighted_gram,
)
from .model import (
    GPPriors,
    PathPrior,
    PLDSParams,
    TrialData,
    VIState,
    expected_log_rate,
    g_moments,
    path_prior,
    trial_objective,
)


def step_paths_mean(data: TrialData, p: PLDSParams, st: VIState, prior: PathPrior) -> VIState:
    """One damped Newton step of every trial's path mean m at fixed S (concave in m)."""
    R = data.shape[0]
    _, log_lam = expected_log_rate(p, st)
    lam = torch.exp(log_lam) * data.weight
    grad = (data.y * data.weight - lam) @ p.C - (bt.matvec(prior.D, prior.Lo, st.m) - prior.eta)
    Lo = prior.Lo.expand(R, *prior.Lo.shape[1:])
    try:
        fac = bt.cholesky(prior.D + weighted_gram(lam, p.C), Lo)
    except torch.linalg.LinAlgError:
        skipped("paths' mean (Newton Hessian not positive definite)")
        return st
    step = bt.solve(fac, grad)
    old = trial_objective(data, p, prior, st)

    def propose(rho):
        cand = replace(st, m=st.m + rho[:, None, None] * step)
        return trial_objective(data, p, prior, cand), cand

    _, cand, _ = halve_until(old, propose, R, st.m)
    return cand


def step_means(
    data: TrialData, p: PLDSParams, st: VIState, prior: PathPrior, gp: GPPriors
) -> VIState:
    """One damped Newton step in all means at once: the paths m and the modulator hm.

    The bound is concave in the means at fixed covariances. With ``W[r,t] = C' diag(rate) C``
    the Hessian is ``[[H_xx, H_xh], [H_hx, H_hh + K^-1]]``: ``H_xx`` block tridiagonal per
    trial, ``H_xh`` the stacked ``W[r,t]``, ``H_hh = blockdiag_r(sum_t W[r,t])``, ``K^-1`` the
    GP precision per dimension. Each trial's path is eliminated through its block-tridiagonal
    factor (``U = H_xx^-1 H_xh``, k right-hand sides), leaving per-trial k x k Schur
    complements; the modulator system ``(blockdiag_r(Schur_r) + K^-1) dh = g`` is solved by
    conjugate gradients preconditioned per dimension with ``(K_j^-1 + diag(Schur_jj))^-1``,
    so no (k R) x (k R) matrix is formed. Then ``dx = H_xx^-1 g_x - U dh``; the step is
    halved until the bound does not fall. Mean and path coordinates move together, which
    the alternating updates of two nearly collinear blocks (a trial's mean latent and h[r])
    could not do."""
    if gp.hK is None:
        return step_paths_mean(data, p, st, prior)
    R = data.shape[0]
    _, log_lam = expected_log_rate(p, st)
    lam = torch.exp(log_lam) * data.weight
    resid = (data.y * data.weight - lam) @ p.C  # (R, T, k)
    W = weighted_gram(lam, p.C)  # (R, T, k, k)
    Lo = prior.Lo.expand(R, *prior.Lo.shape[1:])
    try:
        fac = bt.cholesky(prior.D + W, Lo)
        Lk = torch.linalg.cholesky(gp.hK)
    except torch.linalg.LinAlgError:
        skipped("joint mean of paths and h (Hessian or GP kernel not positive definite)")
        return st
    g_x = resid - (bt.matvec(prior.D, prior.Lo, st.m) - prior.eta)
    g_h = resid.sum(1) - kernel_solve(Lk, st.hm - gp.hmu.T)
    U = bt.solve_matrix(fac, W)  # (R, T, k, k): blocks of H_xx^-1 H_xh
    v = bt.solve(fac, g_x)
    # Schur_r = sum_t W_t - sum_t W_t' U_t ; rhs = g_h - sum_t W_t' v_t
    schur = W.sum(1) - (W.mT @ U).sum(1)
    schur = sym(schur)
    rhs = g_h - (W.mT @ v[..., None]).sum(1)[..., 0]
    # preconditioner: (K^-1 + diag(Schur_jj))^-1 per dimension
    Pm = site_covariance(gp.hK, torch.diagonal(schur, dim1=-2, dim2=-1).T)

    def apply(x):
        return (schur @ x[..., None])[..., 0] + kernel_solve(Lk, x)

    def precond(r):
        return (Pm @ r.T[..., None])[..., 0].T

    dh = conjugate_gradients(apply, precond, rhs)
    dx = v - (U @ dh[:, None, :, None])[..., 0]

    def total(cand):
        value = trial_objective(data, p, prior, cand).sum()
        a = torch.linalg.solve_triangular(Lk, (cand.hm - gp.hmu.T).T[..., None], upper=False)
        return value - 0.5 * (a**2).sum()

    old = total(st).reshape(1)

    def propose(rho):
        cand = replace(st, m=st.m + rho * dx, hm=st.hm + rho * dh)
        return total(cand).reshape(1), cand

    _, cand, _ = halve_until(old, propose, 1, st.m)
    return cand


def h_schur(data: TrialData, p: PLDSParams, st: VIState) -> torch.Tensor:
    """(R, k, k) what each trial's spikes say about h[r] beyond what its path explains, under
    the Laplace approximation of the joint posterior of the paths and h at q's means: the
    Schur complement ``Schur_r = sum_t W[r,t] - sum_t W[r,t]' U[r,t]`` (``W = C' diag(rate)
    C``, ``U = H_xx^-1 H_xh``), each trial's path eliminated (as :func:`step_means` does)."""
    R = data.shape[0]
    prior = path_prior(p, R, data.shape[1], data.u, *g_moments(st))
    _, log_lam = expected_log_rate(p, st)
    W = weighted_gram(torch.exp(log_lam) * data.weight, p.C)
    fac = bt.cholesky(prior.D + W, prior.Lo.expand(R, *prior.Lo.shape[1:]))
    return sym(W.sum(1) - (W.mT @ bt.solve_matrix(fac, W)).sum(1))


def h_schur_diag(data: TrialData, p: PLDSParams, st: VIState) -> torch.Tensor:
    """(k, R) the diagonal of :func:`h_schur`: each dimension's information with the others
    held fixed."""
    return torch.diagonal(h_schur(data, p, st), dim1=-2, dim2=-1).T.clamp(min=0)


def h_joint_covariance(data: TrialData, p: PLDSParams, st: VIState, gp: GPPriors) -> torch.Tensor:
    """(k, R, R) covariance of the modulator h under the Laplace approximation of the joint
    posterior of the paths and h at q's means, each trial's path eliminated.

    The factorised q(x) q(h) cannot represent that a trial's mean latent may be carried by
    its path or by h[r]: the posterior correlation between them is dropped and q(h)'s
    variance, ``(K_j^-1 + diag_r sum_t W[r,t]_jj)^-1``, is too small. Per dimension,
    ``(K_j^-1 + diag_r Schur_r[j, j])^-1`` (:func:`h_schur_diag`; the coupling between
    dimensions left out, as in q(h)). It still takes the GP hyperparameters as known;
    :mod:`.bands` integrates them out."""
    return site_covariance(gp.hK, h_schur_diag(data, p, st))


def paths_cov(prior: PathPrior, C: torch.Tensor, w: torch.Tensor):
    """(S, cross, logdet_s) of ``S^-1 = Jbar + blockdiag(C' diag(w) C)``."""
    R = w.shape[0]
    fac = bt.cholesky(prior.D + weighted_gram(w, C), prior.Lo.expand(R, *prior.Lo.shape[1:]))
    S, cross = bt.inverse_blocks(fac)
    return S, cross, -bt.logdet(fac)


def step_paths_cov(data: TrialData, p: PLDSParams, st: VIState, prior: PathPrior) -> VIState:
    """Fixed-point step ``w <- E[rate]`` of each trial's path covariance, damped per trial
    (``w <- w + rho (E[rate] - w)``) until the bound does not fall."""
    R = data.shape[0]
    _, log_lam = expected_log_rate(p, st)
    target = torch.exp(log_lam) * data.weight
    old = trial_objective(data, p, prior, st)

    def propose(rho):
        w = st.w + rho[:, None, None] * (target - st.w)
        try:
            S, cross, logdet_s = paths_cov(prior, p.C, w)
        except torch.linalg.LinAlgError:
            skipped("paths' covariance proposal (precision not positive definite)")
            return torch.full_like(old, -math.inf), None
        cand = replace(st, S=S, cross=cross, logdet_s=logdet_s, w=w)
        value = trial_objective(data, p, prior, cand)
        # rho = 0 keeps the stored covariance exactly
        keep = rho == 0
        return torch.where(keep, old, value), (cand, keep)

    _, payload, rho = halve_until(old, propose, R, st.m)
    if payload is None:
        return st
    cand, keep = payload
    if bool(keep.any()):
        sel = keep
        cand.S[sel], cand.cross[sel] = st.S[sel], st.cross[sel]
        cand.logdet_s[sel], cand.w[sel] = st.logdet_s[sel], st.w[sel]
    return cand


def h_objective(G_terms, m, S, mu, K):
    """Per-dimension bound of q(h[:, j]): ``sum_r G_r(m_r, S_rr) - KL``, with
    ``G_r = sum_i [Y_ri c_ij m_r - Lam_ri exp(c_ij (m_r - m_ref) + c_ij^2 (v_r - v_ref) / 2)]``
    (``Lam`` the expected rates at ``m_ref``, ``v_ref``)."""
    Y, Lam, c, m_ref, v_ref = G_terms
    v = torch.diagonal(S, dim1=-2, dim2=-1)  # (J, R)
    # G_r = sum_i [Y_ri c_ij m_rj - Lam_ri exp(c_ij (m - m_ref) + c_ij^2 (v - v_ref) / 2)]
    lin = (Y @ c).T * m  # (J, R): sum_i Y_ri c_ij m_rj
    dm = (m - m_ref).T[:, None, :]  # (R, 1, J)
    dv = (v - v_ref).T[:, None, :]
    rate = (Lam[:, :, None] * torch.exp(c[None] * dm + 0.5 * c[None] ** 2 * dv)).sum(1)  # (R, J)
    value = lin.sum(-1) - rate.sum(0)
    try:
        kl = gaussian_kl(m, S, mu, K)
    except torch.linalg.LinAlgError:
        skipped("q(h) covariance proposal (not positive definite)")
        return torch.full_like(value, -math.inf)
    return value - kl


def step_modulator_cov(data: TrialData, p: PLDSParams, st: VIState, gp: GPPriors) -> VIState:
    """Update the covariance of q(h[:, j]) for each latent dimension j in turn (the means
    move in :func:`step_means`).

    With expected rates ``Lam[r,i] = sum_t E[rate]`` the bound in q(h[:,j]) is
    ``sum_r G_r - KL`` (:func:`h_objective`); the fixed-point proposal is
    ``S' = (K^-1 + diag(wj))^-1`` with ``wj[r] = sum_i c_ij^2 Lam[r,i]``, formed as
    ``K - K W^1/2 (I + W^1/2 K W^1/2)^-1 W^1/2 K`` (no K^-1), accepted along
    ``(1 - rho) S + rho S'`` with rho halved until the bound does not fall (it is concave
    in S).
    """
    if gp.hK is None:
        return st
    k = p.C.shape[1]
    Y = (data.y * data.weight).sum(1)  # (R, N)
    hm, hS = st.hm, st.hS.clone()
    _, log_lam = expected_log_rate(p, st)
    Lam = (torch.exp(log_lam) * data.weight).sum(1)  # (R, N)
    for j in range(k):
        c = p.C[:, j : j + 1]  # (N, 1)
        m, v_ref = hm[:, j][None], torch.diagonal(hS[j])[None]
        terms = (Y, Lam, c, m, v_ref)
        K, mu = gp.hK[j : j + 1], gp.hmu[j : j + 1]
        S_old = hS[j : j + 1]
        old = h_objective(terms, m, S_old, mu, K)
        S_new = site_covariance(K[0], (Lam @ c**2)[:, 0])

        def propose(rho, S_old=S_old, S_new=S_new, terms=terms, m=m, mu=mu, K=K):
            S = S_old + rho[0] * (S_new[None] - S_old)
            return h_objective(terms, m, S, mu, K), S

        _, S, _ = halve_until(old, propose, 1, hm)
        # refresh the rates for the next dimension
        Lam = Lam * torch.exp(0.5 * (torch.diagonal(S, dim1=-2, dim2=-1) - v_ref).T @ (c.T**2))
        hS[j] = S[0]
    return replace(st, hS=hS)


def step_dynamics_drift(data: TrialData, p: PLDSParams, st: VIState, gp: GPPriors) -> VIState:
    """Exact update of q(g): the bound is quadratic in g given q(x), so
    ``gS = (K_g^-1 + diag(a))^-1``, ``gm = gS (K_g^-1 gmu + b)`` with
    ``a[r] = sum_t E[x_{t-1}' A1'Q^-1 A1 x_{t-1}]`` and
    ``b[r] = sum_t E[(x_t - A x_{t-1} - B u_t)' Q^-1 A1 x_{t-1}]``."""
    if gp.gK is None:
        return st
    a, b = g_quadratic(data, p, st)
    K = gp.gK
    gS = site_covariance(K, a)
    # posterior mean of N(gmu, K) times exp(-a g^2/2 + b g): solve (K^-1 + diag a) m = K^-1 gmu + b
    gm = gS @ (torch.cholesky_solve(gp.gmu[:, None], torch.linalg.cholesky(K))[:, 0] + b)
    return replace(st, gm=gm, gS=gS)


def path_stats(st: VIState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-trial sums of E[x_{t-1} x_{t-1}'], E[x_t x_{t-1}'], E[x_t x_t'] for t >= 1:
    each (R, k, k)."""
    m = st.m
    Ex = st.S + m[..., :, None] * m[..., None, :]
    S00 = Ex[:, :-1].sum(1)
    S11 = Ex[:, 1:].sum(1)
    S10 = (st.cross + m[:, 1:, :, None] * m[:, :-1, None, :]).sum(1)
    return S00, S10, S11


def g_quadratic(data: TrialData, p: PLDSParams, st: VIState):
    Qi = torch.linalg.inv(p.Q)
    S00, S10, _ = path_stats(st)
    QA1 = Qi @ p.A1
    a = (p.A1.T @ QA1 * S00).sum((-1, -2))  # tr(A1'Qi A1 S00)
    # E[r_t x_{t-1}'] = S10 - A S00 - B u_t m_{t-1}'
    Erx = S10 - p.A @ S00
    if data.u is not None and p.B is not None:
        b_in = data.u[:, 1:] @ p.B.T  # (R, T-1, k)
        Erx = Erx - b_in.mT @ st.m[:, :-1]
    b = (QA1 * Erx).sum((-1, -2))  # tr(A1' Qi Erx) = sum(Qi A1 * Erx)
    return a, b


def estep(data: TrialData, p: PLDSParams, st: VIState, gp: GPPriors) -> VIState:
    """One pass of every variational update (paths' means and covariances, h, g)."""
    R, T, _ = data.shape
    prior = path_prior(p, R, T, data.u, *g_moments(st))
    st = step_means(data, p, st, prior, gp)
    st = step_paths_cov(data, p, st, prior)
    st = step_modulator_cov(data, p, st, gp)
    if gp.gK is not None:
        st = step_dynamics_drift(data, p, st, gp)
    return st
