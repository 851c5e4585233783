"""M-steps of the N-PLDS variational EM: dynamics (closed forms for x0, V0, A, A1, B, Q),
emissions (per-neuron Newton steps for (c_i, d_i)) and the GP hyperparameters (L-BFGS-B on
the exact part of the bound that moves with them, its gradient in closed form)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from .._linalg import psd_project, sym
from ._numerics import active_guards, halve_until, outer_flat, site_posterior, skipped
from .estep import g_quadratic, path_stats
from .model import (
    NUGGET,
    TAU_RANGE,
    PLDSParams,
    TrialData,
    VIState,
    expected_log_rate,
    offset_kl,
    se_kernel,
)


def mstep_dynamics(data: TrialData, p: PLDSParams, st: VIState) -> PLDSParams:
    """Closed-form x0, V0, A (and A1, B) and Q: the exact maximisers of the bound.

    Regression of x_t on ``phi_t = [x_{t-1}; g x_{t-1}; u_t]`` under q:
    ``W = E[x_t phi']  E[phi phi']^-1``, ``Q = (E[x_t x_t'] - W E[phi x_t']) / (R (T-1))``.
    """
    R, T, _ = data.shape
    k = p.A.shape[0]
    x0 = st.m[:, 0].mean(0)
    dev = st.m[:, 0] - x0
    V0 = (st.S[:, 0] + dev[:, :, None] * dev[:, None, :]).mean(0)
    V0 = sym(V0) + 1e-9 * torch.eye(k, dtype=V0.dtype, device=V0.device)
    S00, S10, S11 = path_stats(st)
    blocks_xx = [[S00.sum(0)]]  # E[phi phi'] built blockwise
    cross = [S10.sum(0)]  # E[x_t phi']
    if p.dynamics_drift:
        gm, gv = st.gm, torch.diagonal(st.gS)
        g2 = gm**2 + gv
        blocks_xx = [
            [S00.sum(0), (gm[:, None, None] * S00).sum(0)],
            [(gm[:, None, None] * S00).sum(0), (g2[:, None, None] * S00).sum(0)],
        ]
        cross.append((gm[:, None, None] * S10).sum(0))
    has_u = data.u is not None and p.B is not None
    if has_u:
        u1 = data.u[:, 1:]  # (R, T-1, mu)
        xu = st.m[:, :-1].mT @ u1  # (R, k, mu): sum_t m_{t-1} u_t'
        uu = (u1.mT @ u1).sum(0)
        col = [xu.sum(0)]
        if p.dynamics_drift:
            col.append((gm[:, None, None] * xu).sum(0))
        for row, c in zip(blocks_xx, col, strict=True):
            row.append(c)
        blocks_xx.append([c.T for c in col] + [uu])
        cross.append((st.m[:, 1:].mT @ u1).sum(0))
    Phi = torch.cat([torch.cat(row, 1) for row in blocks_xx], 0)
    Xphi = torch.cat(cross, 1)
    Phi = sym(Phi)
    ridge = 1e-9 * torch.diagonal(Phi).mean() * torch.eye(len(Phi), dtype=Phi.dtype)
    W = torch.linalg.solve(Phi + ridge.to(Phi.device), Xphi.T).T
    Q = (S11.sum(0) - W @ Xphi.T) / (R * (T - 1))
    Q = psd_project(Q, 1e-8, relative=True, guards=active_guards())
    A = W[:, :k]
    A1 = W[:, k : 2 * k] if p.dynamics_drift else None
    B = W[:, -p.B.shape[1] :] if has_u else p.B
    return replace(p, A=A, A1=A1, B=B, Q=Q, x0=x0, V0=V0)


def mstep_emissions(data: TrialData, p: PLDSParams, st: VIState, steps: int = 1) -> PLDSParams:
    """Damped Newton steps for (c_i, d_i), per neuron (the bound is concave in them).

    With ``Mt = [m + hm; 1]`` and ``P_i = sum_{r,t} E[rate] V[r,t]`` the gradient is
    ``sum (y - E[rate]) Mt - [P_i c_i; 0]`` and the curvature used is
    ``sum E[rate] Mt Mt' + blockdiag(P_i, 0)`` (the exact Hessian's leading terms); steps are
    halved per neuron until its term of the bound does not fall.
    """
    R, T, N = data.shape
    k = p.C.shape[1]
    M = (st.m + st.hm[:, None, :]).reshape(R * T, k)
    Mt = torch.cat([M, M.new_ones(R * T, 1)], 1)
    V = (st.S + torch.diag_embed(st.hv)[:, None]).reshape(R * T, k, k)
    Vq = V.reshape(R * T, k * k)
    y = data.y.reshape(R * T, N)
    MtMt = outer_flat(Mt)
    Cd = torch.cat([p.C, p.d[:, None]], 1)  # (N, k+1)
    mask = data.mask
    W = data.weight.expand(R, T, N).reshape(R * T, N)  # 0 on missing bins

    off = p.offset_log_rate()  # (T, N) or 0: the offset's part of log E[rate]
    if st.em is not None:  # and the neurons' own drift's
        off = off + (st.em + 0.5 * st.ev)[:, None, :]
    if p.offset or st.em is not None:
        off = off.expand(R, T, N).reshape(R * T, N)

    def neuron_terms(Cd):
        C = Cd[:, :k]
        mean = Mt @ Cd.T
        log_lam = mean + 0.5 * (Vq @ outer_flat(C).T) + off
        lam = torch.exp(log_lam) * W
        return ((y * W * mean - lam).sum(0)), lam

    for _ in range(steps):
        old, lam = neuron_terms(Cd)
        P = (lam.T @ Vq).reshape(N, k, k)
        grad = (y * W - lam).T @ Mt
        grad[:, :k] -= (P @ Cd[:, :k, None])[..., 0]
        H = (lam.T @ MtMt).reshape(N, k + 1, k + 1)
        H[:, :k, :k] += P
        H = H + 1e-9 * torch.eye(k + 1, dtype=H.dtype, device=H.device) * (
            torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)[:, None, None] + 1e-12
        )
        step = torch.linalg.solve(H, grad[..., None])[..., 0]
        step = torch.where(mask[:, None], step, torch.zeros_like(step))

        def propose(rho, Cd=Cd, step=step):
            cand = Cd + rho[:, None] * step
            return neuron_terms(cand)[0], cand

        _, Cd, _ = halve_until(old, propose, N, Cd)
    return replace(p, C=Cd[:, :k].contiguous(), d=Cd[:, k].contiguous())


def _site_part(K, dKs, w, b, value):
    """The part of the bound that GP hyperparameters move, and its gradient, in closed form.

    With the site terms ``t(h) = exp(b'h - h'Wh / 2)`` fixed (W = diag w), q is the site
    posterior ``N(m, S)``, ``S = (K^-1 + W)^-1 = K A``, ``m = K alpha`` with
    ``A = (I + W K)^-1`` and ``alpha = A b``, and the bound's part is::

        F = value(m, diag S) - KL(q || N(0, K))
        -KL = -b'm / 2 - log det(I + K W) / 2 + m'W m / 2 + tr(W S) / 2

    (``KL = E_q log t - log Z``, ``Z = det(I + KW)^-1/2 exp(b'S b / 2)``). Since
    ``dS = A' dK A`` and ``dm = A' dK alpha``, the gradient with respect to K is::

        dF/dK = sym(A diag(h_s) A' + (A h_m) alpha' - A W / 2),
        h_s = dvalue/d(diag S) + w / 2,   h_m = dvalue/dm - b / 2 + W m,

    which needs no K^-1 (I + WK has eigenvalues >= 1 however ill-conditioned K is).

    K (J, R, R); dKs: list of (J, R, R), dK/dtheta_p for each hyperparameter vector; w, b
    (J, R); value(m, v) -> (value, d/dm, d/dv) with m, v (J, R). Returns ``(-F, [-dF/dtheta_p
    (J,)])``.
    """
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    X = eye + w[..., :, None] * K
    A = torch.linalg.inv(X)
    alpha = (A @ b[..., None])[..., 0]
    m = (K @ alpha[..., None])[..., 0]
    v = torch.diagonal(K @ A, dim1=-2, dim2=-1)
    val, g_m, g_v = value(m, v)
    logdet = torch.linalg.slogdet(X)[1]
    F = val + 0.5 * ((w * m * m).sum() + (w * v).sum() - (b * m).sum() - logdet.sum())
    h_s = g_v + 0.5 * w
    h_m = g_m - 0.5 * b + w * m
    G = (A * h_s[..., None, :]) @ A.mT + (A @ h_m[..., None]) * alpha[..., None, :]
    G = G - 0.5 * A * w[..., None, :]
    G = sym(G)
    return -F, [-(G * dK).sum((-1, -2)) for dK in dKs]


def _kernel_step(kernel, theta, bounds, w, b, value, m0, S0, iters, current=None):
    """Move GP hyperparameters and their q together: with the site terms (w, b) fixed,
    ``q_theta = N(S b, S)``, ``S = (K_theta^-1 + diag w)^-1``, and L-BFGS-B maximises
    ``value(m, S) - KL(q_theta || N(0, K_theta))`` (:func:`_site_part`, with its gradient in
    closed form), the exact part of the bound that depends on them, within ``bounds`` (one
    ``(lo, hi)`` per hyperparameter vector). The result replaces the current (theta, q) only
    if that part of the bound rises (above ``current``, its value at the current (theta, q),
    when given; else at the site posterior of the current theta).
    ``kernel(*theta) -> (K, [dK/dtheta_p])``. Returns (theta, m, S)."""
    import scipy.optimize

    sizes = [t.numel() for t in theta]
    like = theta[0]

    def unpack(x: np.ndarray) -> list[torch.Tensor]:
        parts = np.split(np.asarray(x, dtype=np.float64), np.cumsum(sizes)[:-1])
        return [torch.as_tensor(q, dtype=like.dtype, device=like.device) for q in parts]

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        K, dKs = kernel(*unpack(x))
        f, grads = _site_part(K, dKs, w, b, value)
        # a hyperparameter shared by every site group (one kernel for all) sums their parts
        grads = [
            g if g.numel() == n else g.sum().reshape(1) for g, n in zip(grads, sizes, strict=True)
        ]
        return float(f), torch.cat(grads).cpu().numpy()

    x0 = torch.cat([t.reshape(-1) for t in theta]).cpu().numpy()
    box = [lohi for lohi, n in zip(bounds, sizes, strict=True) for _ in range(n)]
    x0 = np.clip(x0, [lo for lo, _ in box], [hi for _, hi in box])
    with torch.no_grad():
        try:
            current = objective(x0)[0] if current is None else float(current)
            res = scipy.optimize.minimize(
                objective,
                x0,
                jac=True,
                method="L-BFGS-B",
                bounds=box,
                options={"maxiter": iters},
            )
        except torch.linalg.LinAlgError:
            skipped("GP hyperparameters (a kernel's factor failed)")
            return theta, m0, S0
        if not (np.isfinite(res.fun) and res.fun < current):
            return theta, m0, S0
        new = [q.reshape(t.shape) for q, t in zip(unpack(res.x), theta, strict=True)]
        m, S = site_posterior(kernel(*new)[0], w, b)
    return new, m, S


def _summed(data: TrialData, p: PLDSParams, st: VIState, axis: int):
    """Counts and expected rates under q summed over ``axis`` of (R, T, N), observed bins
    only: (Y, Lam), each (R, N) for axis 1 (per trial) or (T, N) for axis 0 (per bin)."""
    _, log_lam = expected_log_rate(p, st)
    return (data.y * data.weight).sum(axis), (torch.exp(log_lam) * data.weight).sum(axis)


def mstep_kernels(
    data: TrialData, p: PLDSParams, st: VIState, iters: int = 10, min_tau: float = TAU_RANGE[0]
) -> tuple[PLDSParams, VIState]:
    """GP hyperparameters by L-BFGS-B on their log, moving q(h) and q(g) with them
    (:func:`_kernel_step`); without that, q's covariance, shaped by the current kernel, pins
    the hyperparameters where they started.

    Sites for h: ``w[j, r] = sum_i c_ij^2 Lam[r, i]`` (the fixed point of the covariance step)
    and ``b = (K^-1 + W) hm`` (so the site q at the current kernel has the current means); the
    bound's h part is ``sum_{r,i} [Y c_i'h_r - Lam exp(c_i'(dm_r) + c_i^2'dv_r / 2)] - KL``.
    Sites for g are exact (the bound is quadratic in g): ``w = a``, ``b`` of
    :func:`step_dynamics_drift`. Length-scales stay between ``min_tau`` trials (what "slow"
    means: a faster modulator is trial-to-trial variability, not drift) and ``TAU_RANGE[1]``
    times the span of the trial numbers, variances within [1e-8, 1e3]. Returns the new
    parameters and q.
    """
    n = data.n
    span = float((n.max() - n.min()).clamp(min=1.0))
    lo_tau, hi_tau = math.log(min_tau), math.log(TAU_RANGE[1] * span)
    if p.drift:
        Y, Lam = _summed(data, p, st, 1)  # (R, N)
        C2 = p.C**2
        m0, S0 = st.hm.T, st.hS  # (k, R), (k, R, R)
        v0 = torch.diagonal(S0, dim1=-2, dim2=-1)
        w = (Lam @ C2).T  # (k, R)
        K0 = se_kernel(n, torch.exp(p.log_sigma2), torch.exp(p.log_tau))
        b = w * m0 + torch.cholesky_solve(m0[..., None], torch.linalg.cholesky(K0))[..., 0]
        YC = Y @ p.C  # (R, k)

        def value(m, v):
            rate = Lam * torch.exp((m - m0).T @ p.C.T + 0.5 * (v - v0).T @ C2.T)
            return (YC * m.T).sum() - rate.sum(), (YC - rate @ p.C).T, -0.5 * (rate @ C2).T

        d2 = (n[:, None] - n[None, :]) ** 2
        eye = torch.eye(len(n), dtype=n.dtype, device=n.device)

        def kernel(ls2, lt):
            sigma2 = torch.exp(ls2)[:, None, None]
            K = se_kernel(n, torch.exp(ls2), torch.exp(lt))
            dtau = (K - sigma2 * NUGGET * eye) * d2 / torch.exp(2 * lt)[:, None, None]
            return K, [K, dtau]

        (ls2, lt), m, S = _kernel_step(
            kernel,
            [p.log_sigma2, p.log_tau],
            [(-18.4, 6.9), (lo_tau, hi_tau)],
            w,
            b,
            value,
            m0,
            S0,
            iters,
        )
        p = replace(p, log_sigma2=ls2, log_tau=lt)
        st = replace(st, hm=m.T.contiguous(), hS=S)
    if p.dynamics_drift:
        a, bg = g_quadratic(data, p, st)
        one = n.new_ones(1)

        def value_g(m, v):
            value = (-0.5 * a * (m**2 + v) + bg * m).sum()
            return value, (bg - a * m).expand_as(m), (-0.5 * a).expand_as(v)

        d2g = (n[:, None] - n[None, :]) ** 2
        eye = torch.eye(len(n), dtype=n.dtype, device=n.device)

        def kernel_g(lt):
            K = se_kernel(n, one, torch.exp(lt).reshape(1))
            return K, [(K - NUGGET * eye) * d2g / torch.exp(2 * lt).reshape(1, 1, 1)]

        (lt,), m, S = _kernel_step(
            kernel_g,
            [p.log_tau_g],
            [(lo_tau, hi_tau)],
            a[None],
            bg[None],
            value_g,
            st.gm[None],
            st.gS[None],
            iters,
        )
        p = replace(p, log_tau_g=lt)
        st = replace(st, gm=m[0], gS=S[0])
    return p, st


#: Bounds of the offset's length-scale, in bins (the upper one times the trial's bins).
OFFSET_LF_RANGE = (0.5, 2.0)


def _private_gp_step(Y, Lam, m0, S0, log_s2, log_l, x, l_bounds, iters):
    """One update of independent GP terms added to each neuron's log rate, ``z[:, i] ~
    GP(0, s2_i K_l)`` over coordinates ``x`` (J,) (bins for the offset, trial numbers for the
    neurons' own drift), with ``q(z[:, i]) = N(m_i, S_i)``.

    Y, Lam: (N, J) counts and expected rates summed over the other axis (observed bins only),
    at the current q: m0 (N, J), S0 (N, J, J). The bound's part, per neuron, is
    ``sum_j [Y m - Lam exp(dm + dv / 2)] - KL(q(z_i) || N(0, s2_i K_l))`` (``dm``, ``dv`` the
    changes of q's mean and variance). Newton in the mean and the fixed point of the
    covariance together give the site posterior ``S' = (K_i^-1 + diag Lam_i)^-1``,
    ``m' = S' (Lam_i m + Y_i - Lam_i)``, taken along ``(1 - rho) q + rho q'`` with rho halved
    per neuron until its part does not fall (it is concave on that line). Then each neuron's
    ``s2_i`` and the shared ``l`` move with q by L-BFGS-B (:func:`_kernel_step`), ``l`` within
    ``l_bounds``, ``s2_i`` within [1e-8, 1e2]. Returns (m, S, log_s2 (N,), log_l ())."""
    K1 = se_kernel(x, x.new_ones(1), torch.exp(log_l).reshape(1))[0]
    K = torch.exp(log_s2)[:, None, None] * K1
    v0 = torch.diagonal(S0, dim1=-2, dim2=-1)

    def rates(m, v):
        return Lam * torch.exp((m - m0) + 0.5 * (v - v0))

    def part(m, S):
        v = torch.diagonal(S, dim1=-2, dim2=-1)
        try:
            kl = offset_kl(m, S, log_s2, K1)
        except torch.linalg.LinAlgError:
            skipped("a private GP term's proposal (not positive definite)")
            return torch.full_like(m[:, 0], -math.inf)
        return (Y * m).sum(-1) - rates(m, v).sum(-1) - kl

    try:
        m_new, S_new = site_posterior(K, Lam, Lam * m0 + Y - Lam)
    except torch.linalg.LinAlgError:
        skipped("a private GP term (site factor failed)")
        return m0, S0, log_s2, log_l

    def propose(rho):
        m = m0 + rho[:, None] * (m_new - m0)
        S = S0 + rho[:, None, None] * (S_new - S0)
        return part(m, S), (m, S)

    _, (m1, S1), _ = halve_until(part(m0, S0), propose, Y.shape[0], m0)
    w = rates(m1, torch.diagonal(S1, dim1=-2, dim2=-1))
    try:
        Kinv_m = torch.cholesky_solve(m1.T, torch.linalg.cholesky(K1)).T
    except torch.linalg.LinAlgError:
        skipped("a private GP term's hyperparameters (kernel factor failed)")
        return m1, S1, log_s2, log_l
    b = w * m1 + Kinv_m / torch.exp(log_s2)[:, None]

    def value(m, v):
        rate = rates(m, v)
        return (Y * m).sum() - rate.sum(), Y - rate, -0.5 * rate

    d2 = (x[:, None] - x[None, :]) ** 2
    eye = torch.eye(len(x), dtype=x.dtype, device=x.device)

    def kernel(ls2, ll):
        K1 = se_kernel(x, x.new_ones(1), torch.exp(ll))[0]
        dl = (K1 - NUGGET * eye) * d2 / torch.exp(2 * ll)
        s2 = torch.exp(ls2)[:, None, None]
        return s2 * K1, [s2 * K1, s2 * dl]

    (ls2, ll), m, S = _kernel_step(
        kernel,
        [log_s2, log_l.reshape(1)],
        [(-18.4, 4.6), l_bounds],
        w,
        b,
        value,
        m1,
        S1,
        iters,
        current=-float(part(m1, S1).sum()),
    )
    return m, S, ls2, ll.reshape(())


def mstep_offset(data: TrialData, p: PLDSParams, st: VIState, iters: int = 10) -> PLDSParams:
    """Update q(f) of the time-in-trial offset, then its hyperparameters with it
    (:func:`_private_gp_step` over bins 0..T-1, with ``Y[t,i] = sum_r y`` and
    ``Lam[t,i] = sum_r E[rate]``); ``lf`` within ``OFFSET_LF_RANGE`` bins (times T for the
    upper bound)."""
    if not p.offset:
        return p
    T = data.shape[1]
    Y, Lam = (a.T for a in _summed(data, p, st, 0))  # (N, T), at the current q(f)
    t = torch.arange(T, dtype=Y.dtype, device=Y.device)
    lo, hi = OFFSET_LF_RANGE
    m, S, ls2, ll = _private_gp_step(
        Y, Lam, p.f_mean.T, p.f_cov, p.log_sf2, p.log_lf, t, (math.log(lo), math.log(hi * T)), iters
    )
    return replace(p, f_mean=m.T.contiguous(), f_cov=S, log_sf2=ls2, log_lf=ll)


def mstep_neuron_drift(
    data: TrialData, p: PLDSParams, st: VIState, iters: int = 10, min_tau: float = TAU_RANGE[0]
) -> tuple[PLDSParams, VIState]:
    """Update q(e) of the neurons' own drift over trials and its hyperparameters
    (:func:`_private_gp_step` over the trial numbers, with ``Y[r,i] = sum_t y`` and
    ``Lam[r,i] = sum_t E[rate]``); the length-scale between ``min_tau`` trials and
    ``TAU_RANGE[1]`` times the span of the trial numbers."""
    if not p.neuron_drift:
        return p, st
    n = data.n
    span = float((n.max() - n.min()).clamp(min=1.0))
    Y, Lam = (a.T for a in _summed(data, p, st, 1))  # (N, R)
    bounds = (math.log(min_tau), math.log(TAU_RANGE[1] * span))
    m, S, ls2, ll = _private_gp_step(Y, Lam, st.em.T, st.eS, p.log_se2, p.log_le, n, bounds, iters)
    return replace(p, log_se2=ls2, log_le=ll), replace(st, em=m.T.contiguous(), eS=S)
