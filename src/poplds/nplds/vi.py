"""Variational EM for the hierarchical (non-stationary) Poisson LDS over trials.

Model, for trial r (trial number ``n_r``), bin t, neuron i, latents k::

    y[r,t,i] ~ Poisson(exp(c_i'(x[r,t] + h[r]) + d_i))
    x[r,0] ~ N(x0, V0),   x[r,t] = A[r] x[r,t-1] + B u[r,t] + w,   w ~ N(0, Q)
    h[:,j] ~ GP(0, K_j),  K_j[r,s] = sigma2_j exp(-(n_r - n_s)^2 / (2 tau_j^2))   (j = 1..k)
    A[r] = A + g[r] A1,   g ~ GP(0, K_g),  K_g: variance 1, length-scale tau_g   (variant)

The stationary PLDS is ``h = 0`` and ``A[r] = A``. Every kernel carries a nugget
``1e-6 sigma2`` on its diagonal (part of the model, for a stable Cholesky factor).

Variational family ``q = prod_r q(x_r) prod_j q(h[:,j]) q(g)``, all Gaussian:

- ``q(x_r) = N(m_r, S_r)`` with ``S_r^-1 = Jbar_r + blockdiag_t(C' diag(w[r,t]) C)``, block
  tridiagonal (``Jbar_r`` is the expected prior precision of the path); only the diagonal and
  lag-one blocks of ``S_r`` are formed.
- ``q(h[:,j]) = N(hm[:,j], hS[j])`` (trials x trials), independent across latent dimensions.
- ``q(g) = N(gm, gS)``.

Evidence lower bound (exact, in closed form)::

    ELBO = sum_{r,t,i} [y (c_i'M[r,t] + d_i) - exp(c_i'M[r,t] + d_i + c_i'V[r,t]c_i / 2)
                        - log y!]
           + sum_r (E_q log p(x_r | A[r]) + H[q(x_r)]) - KL(q(h) || p(h)) - KL(q(g) || p(g))

with ``M[r,t] = m[r,t] + hm[r]`` and ``V[r,t] = S_r[t,t] + diag(hv[r])`` (``hv`` the marginal
variances of h), since ``E[exp(c'z)] = exp(c' mu + c' Sigma c / 2)`` for Gaussian z.

Each EM iteration takes, in turn, a Newton step in m (Hessian
``Jbar + blockdiag(C' diag(lambda) C)``, block-tridiagonal, batched over trials), the
fixed-point step ``w <- lambda`` (expected rates) for S, a Newton/fixed-point step for each
``q(h[:,j])``, the exact update of ``q(g)``, then the M-step: closed forms for x0, V0, A, A1, B,
Q; per-neuron Newton steps for (c_i, d_i); L-BFGS-B on the kernels' log hyperparameters. Every
step that is not an exact maximiser is damped (halved per trial, neuron or dimension) until the
bound does not fall, so the bound never decreases. Iteration stops when the bound rose by less
than ``tol * |bound|`` over the last ``WINDOW`` (10) iterations: a slow phase of EM, whose
increments shrink for a while and then grow again, is not taken for convergence.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import threadpoolctl
import torch

from .._logging import get_logger
from . import _blocktri as bt
from ._accelerate import extrapolate

log = get_logger()

#: Relative nugget added to every GP kernel's diagonal.
NUGGET = 1e-6
#: Bounds of the GP length-scales, in units of the span of trial numbers.
TAU_RANGE = (0.5, 10.0)


# ----------------------------------------------------------------------------- parameters


@dataclass
class PLDSParams:
    """Parameters of the (non-stationary) Poisson LDS (float64 tensors).

    C: (N, k); d: (N,) log rate per bin at zero latent; A, Q, V0: (k, k); x0: (k,);
    B: (k, m) input weights or None; log_sigma2, log_tau: (k,) GP hyperparameters of h, or None
    for the stationary model; A1: (k, k) direction of the dynamics drift and log_tau_g: ()
    its GP length-scale, or None without the dynamics variant.
    """

    C: torch.Tensor
    d: torch.Tensor
    A: torch.Tensor
    Q: torch.Tensor
    x0: torch.Tensor
    V0: torch.Tensor
    B: torch.Tensor | None = None
    log_sigma2: torch.Tensor | None = None
    log_tau: torch.Tensor | None = None
    A1: torch.Tensor | None = None
    log_tau_g: torch.Tensor | None = None

    @property
    def drift(self) -> bool:
        """True for the non-stationary model (a GP modulator h)."""
        return self.log_sigma2 is not None

    @property
    def dynamics_drift(self) -> bool:
        """True for the variant with trial-varying dynamics A[r] = A + g[r] A1."""
        return self.A1 is not None

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Every parameter as a numpy array (None ones left out)."""
        return {
            k: v.detach().cpu().numpy()
            for k, v in self.__dict__.items()
            if isinstance(v, torch.Tensor)
        }


def se_kernel(n: torch.Tensor, sigma2: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Squared-exponential kernels over trial numbers with the nugget.

    n: (R,) trial numbers; sigma2, tau: (J,) -> (J, R, R)
    ``K[j, r, s] = sigma2_j (exp(-(n_r - n_s)^2 / (2 tau_j^2)) + NUGGET [r = s])``.
    """
    diff = n[:, None] - n[None, :]
    K = torch.exp(-0.5 * (diff / tau[:, None, None]) ** 2)
    K = K + NUGGET * torch.eye(len(n), dtype=n.dtype, device=n.device)
    return sigma2[:, None, None] * K


def se_cross_kernel(
    n_a: torch.Tensor, n_b: torch.Tensor, sigma2: torch.Tensor, tau: torch.Tensor
) -> torch.Tensor:
    """(J, len(n_a), len(n_b)) kernel between two sets of trial numbers (no nugget)."""
    diff = n_a[:, None] - n_b[None, :]
    return sigma2[:, None, None] * torch.exp(-0.5 * (diff / tau[:, None, None]) ** 2)


def gaussian_kl(
    m: torch.Tensor, S: torch.Tensor, mu: torch.Tensor, K: torch.Tensor
) -> torch.Tensor:
    """KL(N(m, S) || N(mu, K)) for batches: m, mu (J, R); S, K (J, R, R) -> (J,).

    ``KL = [tr(K^-1 S) + (m-mu)' K^-1 (m-mu) - R + log det K - log det S] / 2``.
    """
    Lk = torch.linalg.cholesky(K)
    Ls = torch.linalg.cholesky(S)
    a = torch.linalg.solve_triangular(Lk, (m - mu)[..., None], upper=False)
    B = torch.linalg.solve_triangular(Lk, Ls, upper=False)
    logdet_k = 2 * torch.log(torch.diagonal(Lk, dim1=-2, dim2=-1)).sum(-1)
    logdet_s = 2 * torch.log(torch.diagonal(Ls, dim1=-2, dim2=-1)).sum(-1)
    R = m.shape[-1]
    return 0.5 * ((B**2).sum((-1, -2)) + (a**2).sum((-1, -2)) - R + logdet_k - logdet_s)


def site_covariance(K: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(K^-1 + diag w)^-1`` for K (..., R, R), w (..., R) >= 0, formed as
    ``K - K W^1/2 (I + W^1/2 K W^1/2)^-1 W^1/2 K``: no K^-1, and the matrix factored has
    eigenvalues >= 1 however ill-conditioned K is (the GP posterior covariance of Gaussian
    site terms with precisions w)."""
    sw = torch.sqrt(torch.clamp(w, min=0))
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    Lb = torch.linalg.cholesky(eye + sw[..., :, None] * K * sw[..., None, :])
    KW = K * sw[..., None, :]
    S = K - KW @ torch.cholesky_solve(KW.mT, Lb)
    return 0.5 * (S + S.mT)


def _outer_flat(X: torch.Tensor) -> torch.Tensor:
    """(..., a) -> (..., a*a) rows of x x'."""
    return (X[..., :, None] * X[..., None, :]).flatten(-2)


def quad_diag(C: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``c_i' S[...] c_i`` for every neuron: C (N, k), S (..., k, k) -> (..., N), as one matmul
    (no (..., N, k) intermediate)."""
    k = C.shape[1]
    return S.reshape(-1, k * k) @ _outer_flat(C).T if S.ndim > 2 else _outer_flat(C) @ S.flatten()


def _weighted_gram(w: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``C' diag(w[...]) C`` for w (..., N) -> (..., k, k), as one matmul."""
    k = C.shape[1]
    return (w @ _outer_flat(C)).reshape(*w.shape[:-1], k, k)


# ----------------------------------------------------------------------------- prior of paths


@dataclass
class PathPrior:
    """Expected log prior of each trial's path in information form (float64).

    ``E_q(g) log p(x_r) = -x'Jbar x / 2 + eta' x + const`` with block-tridiagonal ``Jbar``:
    D (R or 1, T, k, k), Lo (R or 1, T-1, k, k); eta (R, T, k); const (R,) also holds the
    entropy constant, so that ``prior + (1/2) log det S`` is ``E log p(x) + H[q(x)]``.
    """

    D: torch.Tensor
    Lo: torch.Tensor
    eta: torch.Tensor
    const: torch.Tensor

    def value(
        self, m: torch.Tensor, S: torch.Tensor, cross: torch.Tensor, logdet_s: torch.Tensor
    ) -> torch.Tensor:
        """(R,) ``E log p(x_r) + H[q(x_r)]`` for q = N(m, S) (diagonal and lag-one blocks)."""
        quad = (m * bt.matvec(self.D, self.Lo, m)).sum((-1, -2))
        trace = (self.D * S).sum((-1, -2, -3)) + 2 * (self.Lo * cross).sum((-1, -2, -3))
        return -0.5 * (quad + trace) + (self.eta * m).sum((-1, -2)) + self.const + 0.5 * logdet_s


def path_prior(
    p: PLDSParams,
    R: int,
    T: int,
    u: torch.Tensor | None = None,
    gm: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
) -> PathPrior:
    """The :class:`PathPrior` of R trials of T bins; u (R, T, m) inputs; gm, gv (R,) mean and
    variance of g under q (dynamics variant)::

        D[0] = V0^-1 + E[A'Q^-1 A],  D[t] = Q^-1 + E[A'Q^-1 A],  D[T-1] = Q^-1,
        Lo[t] = -Q^-1 E[A],  eta[0] = V0^-1 x0,  eta[t] += Q^-1 b[t] - E[A]'Q^-1 b[t+1]

    with ``b = B u``, ``E[A] = A + gm A1`` and ``E[A'Q^-1 A] = E[A]'Q^-1 E[A] + gv A1'Q^-1 A1``.
    """
    if T < 2:
        raise ValueError("trials need at least 2 bins")
    k = p.A.shape[0]
    Qi = torch.linalg.inv(p.Q)
    Qi = 0.5 * (Qi + Qi.T)
    V0i = torch.linalg.inv(p.V0)
    V0i = 0.5 * (V0i + V0i.T)
    if p.A1 is not None and gm is not None:
        EA = p.A + gm[:, None, None] * p.A1  # (R, k, k)
        EAQA = EA.mT @ Qi @ EA + gv[:, None, None] * (p.A1.T @ Qi @ p.A1)
    else:
        EA = p.A[None]
        EAQA = (p.A.T @ Qi @ p.A)[None]
    n_batch = EA.shape[0]
    D = (Qi + EAQA)[:, None].expand(n_batch, T, k, k).clone()
    D[:, -1] = Qi
    D[:, 0] += V0i - Qi
    D = 0.5 * (D + D.mT)
    Lo = (-Qi @ EA)[:, None].expand(n_batch, T - 1, k, k)
    eta = torch.zeros((R, T, k), dtype=p.A.dtype, device=p.A.device)
    eta[:, 0] = V0i @ p.x0
    c0 = (p.x0 @ V0i @ p.x0).expand(R).clone()
    if u is not None and p.B is not None:
        b = u @ p.B.T  # (R, T, k); b[:, 0] is unused
        Qb = b[:, 1:] @ Qi  # (R, T-1, k): Q^-1 b[t], t >= 1
        eta[:, 1:] += Qb
        eta[:, :-1] -= (EA.mT @ Qb.mT).mT if n_batch > 1 else Qb @ EA[0]
        c0 = c0 + (b[:, 1:] * Qb).sum((-1, -2))
    logdet_q = torch.linalg.slogdet(p.Q)[1]
    logdet_v0 = torch.linalg.slogdet(p.V0)[1]
    const = -0.5 * c0 - 0.5 * logdet_v0 - 0.5 * (T - 1) * logdet_q + 0.5 * T * k
    return PathPrior(D, Lo, eta, const)


def prior_path_moments(
    p: PLDSParams,
    R: int,
    T: int,
    u: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Marginal prior moments of the paths before seeing a trial's spikes: mean (R, T, k),
    covariance (R, T, k, k); ``g`` (R,) sets the dynamics ``A + g A1`` of each trial."""
    k = p.A.shape[0]
    A = p.A.expand(R, k, k) if g is None or p.A1 is None else p.A + g[:, None, None] * p.A1
    mean = torch.empty((R, T, k), dtype=p.A.dtype, device=p.A.device)
    cov = torch.empty((R, T, k, k), dtype=p.A.dtype, device=p.A.device)
    mean[:, 0], cov[:, 0] = p.x0, p.V0
    b = u @ p.B.T if (u is not None and p.B is not None) else None
    for t in range(1, T):
        mean[:, t] = (A @ mean[:, t - 1, :, None])[..., 0]
        if b is not None:
            mean[:, t] += b[:, t]
        cov[:, t] = A @ cov[:, t - 1] @ A.mT + p.Q
    return mean, cov


# ----------------------------------------------------------------------------- the state


@dataclass
class VIState:
    """Variational posterior (module docstring) over R trials of T bins.

    m: (R, T, k); S: (R, T, k, k); cross: (R, T-1, k, k) ``cov(x[t+1], x[t])``; logdet_s: (R,)
    log det of each trial's path covariance; w: (R, T, N) site precisions defining S;
    hm: (R, k); hS: (k, R, R); gm: (R,); gS: (R, R).
    """

    m: torch.Tensor
    S: torch.Tensor
    cross: torch.Tensor
    logdet_s: torch.Tensor
    w: torch.Tensor
    hm: torch.Tensor
    hS: torch.Tensor
    gm: torch.Tensor | None = None
    gS: torch.Tensor | None = None

    @property
    def hv(self) -> torch.Tensor:
        """(R, k) marginal variances of h."""
        return torch.diagonal(self.hS, dim1=-2, dim2=-1).T


@dataclass
class TrialData:
    """Counts of R trials and what belongs to them.

    y: (R, T, N) float64 counts, NaN where a bin is missing (set to 0 here, and left out of
    every term through ``weight``); mask: (N,) bool neurons that enter the likelihood (all by
    default; co-smoothing hides some); n: (R,) trial numbers; u: (R, T, m) inputs or None;
    weight: (N,) or, with missing bins, (R, T, N) float64: 1 where ``y[r, t, i]`` enters the
    bound; lgamma: () sum of log y! over those entries.
    """

    y: torch.Tensor
    n: torch.Tensor
    u: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    weight: torch.Tensor = field(init=False)
    lgamma: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.mask is None:
            self.mask = torch.ones(self.y.shape[-1], dtype=torch.bool, device=self.y.device)
        missing = torch.isnan(self.y)
        self.weight = self.mask.to(self.y.dtype)
        if bool(missing.any()):
            self.weight = self.weight * (~missing).to(self.y.dtype)
            self.y = torch.where(missing, torch.zeros_like(self.y), self.y)
        self.lgamma = (torch.lgamma(self.y + 1) * self.weight).sum()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.y.shape)  # type: ignore[return-value]


@dataclass
class Priors:
    """GP priors of h and g over the trials being inferred: means hmu (k, R), gmu (R,) and
    covariances hK (k, R, R), gK (R, R). In training they are the GP priors (zero mean); for
    held-out trials, the GP conditionals given the training trials' q."""

    hmu: torch.Tensor | None
    hK: torch.Tensor | None
    gmu: torch.Tensor | None = None
    gK: torch.Tensor | None = None


def training_priors(p: PLDSParams, n: torch.Tensor) -> Priors:
    """Zero-mean GP priors of h and g at trial numbers n (R,)."""
    R = len(n)
    hmu = hK = gmu = gK = None
    if p.drift:
        k = p.C.shape[1]
        hmu = n.new_zeros((k, R))
        hK = se_kernel(n, torch.exp(p.log_sigma2), torch.exp(p.log_tau))
    if p.dynamics_drift:
        gmu = n.new_zeros(R)
        gK = se_kernel(n, n.new_ones(1), torch.exp(p.log_tau_g).reshape(1))[0]
    return Priors(hmu, hK, gmu, gK)


# ----------------------------------------------------------------------------- likelihood terms


def expected_log_rate(p: PLDSParams, st: VIState) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (R, T, N) of ``eta = c'(x + h) + d`` and ``log E[exp(eta)]`` under q."""
    mean = (st.m + st.hm[:, None, :]) @ p.C.T + p.d
    var = quad_diag(p.C, st.S).reshape(mean.shape) + (st.hv @ (p.C**2).T)[:, None, :]
    return mean, mean + 0.5 * var


def expected_loglik(data: TrialData, mean: torch.Tensor, log_lam: torch.Tensor) -> torch.Tensor:
    """(R,) ``sum_{t,i} mask_i (y eta_mean - E[exp(eta)])`` (without log y!)."""
    return ((data.y * mean - torch.exp(log_lam)) * data.weight).sum((-1, -2))


def _trial_objective(data: TrialData, p: PLDSParams, prior: PathPrior, st: VIState) -> torch.Tensor:
    """(R,) the part of the bound that depends on trial r's q(x_r)."""
    mean, log_lam = expected_log_rate(p, st)
    return expected_loglik(data, mean, log_lam) + prior.value(st.m, st.S, st.cross, st.logdet_s)


def elbo(data: TrialData, p: PLDSParams, st: VIState, pri: Priors) -> torch.Tensor:
    """The evidence lower bound (module docstring), a float64 scalar."""
    R, T, _ = data.shape
    prior = path_prior(p, R, T, data.u, *_g_moments(st))
    value = _trial_objective(data, p, prior, st).sum() - data.lgamma
    if pri.hK is not None:
        value = value - gaussian_kl(st.hm.T, st.hS, pri.hmu, pri.hK).sum()
    if pri.gK is not None:
        value = value - gaussian_kl(st.gm[None], st.gS[None], pri.gmu[None], pri.gK[None]).sum()
    return value


def _g_moments(st: VIState) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if st.gm is None:
        return None, None
    return st.gm, torch.diagonal(st.gS)


# ----------------------------------------------------------------------------- E-steps


def _halve_until(
    old: torch.Tensor,
    propose: Callable[[torch.Tensor], tuple[torch.Tensor, object]],
    n: int,
    like: torch.Tensor,
    tries: int = 20,
) -> tuple[torch.Tensor, object, torch.Tensor]:
    """Damped step with a separable objective: ``propose(rho) -> (objective (n,), payload)``
    for per-item step sizes rho (n,). Halves rho where the objective would fall below
    ``old``; items that never improve get rho = 0. Returns (objective, payload, rho)."""
    rho = torch.ones(n, dtype=like.dtype, device=like.device)
    for _ in range(tries):
        value, payload = propose(rho)
        ok = torch.isfinite(value) & (value >= old - 1e-12 * (1 + old.abs()))
        if bool(ok.all()):
            return value, payload, rho
        rho = torch.where(ok, rho, rho / 2)
    rho = torch.where(ok, rho, torch.zeros_like(rho))
    value, payload = propose(rho)
    return value, payload, rho


def step_paths_mean(data: TrialData, p: PLDSParams, st: VIState, prior: PathPrior) -> VIState:
    """One damped Newton step of every trial's path mean m at fixed S (concave in m)."""
    R = data.shape[0]
    _, log_lam = expected_log_rate(p, st)
    lam = torch.exp(log_lam) * data.weight
    grad = (data.y * data.weight - lam) @ p.C - (bt.matvec(prior.D, prior.Lo, st.m) - prior.eta)
    Lo = prior.Lo.expand(R, *prior.Lo.shape[1:])
    try:
        fac = bt.cholesky(prior.D + _weighted_gram(lam, p.C), Lo)
    except torch.linalg.LinAlgError:
        return st
    step = bt.solve(fac, grad)
    old = _trial_objective(data, p, prior, st)

    def propose(rho):
        cand = replace(st, m=st.m + rho[:, None, None] * step)
        return _trial_objective(data, p, prior, cand), cand

    _, cand, _ = _halve_until(old, propose, R, st.m)
    return cand


def _kernel_solve(Lk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K_j^-1 v_j for every dimension: Lk (J, R, R) Cholesky factors, v (R, J) -> (R, J)."""
    return torch.cholesky_solve(v.T[..., None], Lk)[..., 0].T


def _cg(apply, precond, b: torch.Tensor, tol: float = 1e-10, max_iter: int = 200):
    """Preconditioned conjugate gradients for an SPD operator on tensors shaped like b."""
    x = torch.zeros_like(b)
    r = b.clone()
    z = precond(r)
    d = z.clone()
    rz = (r * z).sum()
    bnorm = b.norm().clamp(min=1e-300)
    for _ in range(max_iter):
        Ad = apply(d)
        alpha = rz / (d * Ad).sum()
        x = x + alpha * d
        r = r - alpha * Ad
        if r.norm() <= tol * bnorm:
            break
        z = precond(r)
        rz_new = (r * z).sum()
        d = z + (rz_new / rz) * d
        rz = rz_new
    return x


def step_means(
    data: TrialData, p: PLDSParams, st: VIState, prior: PathPrior, pri: Priors
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
    if pri.hK is None:
        return step_paths_mean(data, p, st, prior)
    R = data.shape[0]
    _, log_lam = expected_log_rate(p, st)
    lam = torch.exp(log_lam) * data.weight
    resid = (data.y * data.weight - lam) @ p.C  # (R, T, k)
    W = _weighted_gram(lam, p.C)  # (R, T, k, k)
    Lo = prior.Lo.expand(R, *prior.Lo.shape[1:])
    try:
        fac = bt.cholesky(prior.D + W, Lo)
        Lk = torch.linalg.cholesky(pri.hK)
    except torch.linalg.LinAlgError:
        return st
    g_x = resid - (bt.matvec(prior.D, prior.Lo, st.m) - prior.eta)
    g_h = resid.sum(1) - _kernel_solve(Lk, st.hm - pri.hmu.T)
    U = bt.solve_matrix(fac, W)  # (R, T, k, k): blocks of H_xx^-1 H_xh
    v = bt.solve(fac, g_x)
    # Schur_r = sum_t W_t - sum_t W_t' U_t ; rhs = g_h - sum_t W_t' v_t
    schur = W.sum(1) - (W.mT @ U).sum(1)
    schur = 0.5 * (schur + schur.mT)
    rhs = g_h - (W.mT @ v[..., None]).sum(1)[..., 0]
    # preconditioner: (K^-1 + diag(Schur_jj))^-1 per dimension
    Pm = site_covariance(pri.hK, torch.diagonal(schur, dim1=-2, dim2=-1).T)

    def apply(x):
        return (schur @ x[..., None])[..., 0] + _kernel_solve(Lk, x)

    def precond(r):
        return (Pm @ r.T[..., None])[..., 0].T

    dh = _cg(apply, precond, rhs)
    dx = v - (U @ dh[:, None, :, None])[..., 0]

    def total(cand):
        value = _trial_objective(data, p, prior, cand).sum()
        a = torch.linalg.solve_triangular(Lk, (cand.hm - pri.hmu.T).T[..., None], upper=False)
        return value - 0.5 * (a**2).sum()

    old = total(st).reshape(1)

    def propose(rho):
        cand = replace(st, m=st.m + rho * dx, hm=st.hm + rho * dh)
        return total(cand).reshape(1), cand

    _, cand, _ = _halve_until(old, propose, 1, st.m)
    return cand


def _paths_cov(prior: PathPrior, C: torch.Tensor, w: torch.Tensor):
    """(S, cross, logdet_s) of ``S^-1 = Jbar + blockdiag(C' diag(w) C)``."""
    R = w.shape[0]
    fac = bt.cholesky(prior.D + _weighted_gram(w, C), prior.Lo.expand(R, *prior.Lo.shape[1:]))
    S, cross = bt.inverse_blocks(fac)
    return S, cross, -bt.logdet(fac)


def step_paths_cov(data: TrialData, p: PLDSParams, st: VIState, prior: PathPrior) -> VIState:
    """Fixed-point step ``w <- E[rate]`` of each trial's path covariance, damped per trial
    (``w <- w + rho (E[rate] - w)``) until the bound does not fall."""
    R = data.shape[0]
    _, log_lam = expected_log_rate(p, st)
    target = torch.exp(log_lam) * data.weight
    old = _trial_objective(data, p, prior, st)

    def propose(rho):
        w = st.w + rho[:, None, None] * (target - st.w)
        try:
            S, cross, logdet_s = _paths_cov(prior, p.C, w)
        except torch.linalg.LinAlgError:
            return torch.full_like(old, -math.inf), None
        cand = replace(st, S=S, cross=cross, logdet_s=logdet_s, w=w)
        value = _trial_objective(data, p, prior, cand)
        # rho = 0 keeps the stored covariance exactly
        keep = rho == 0
        return torch.where(keep, old, value), (cand, keep)

    _, payload, rho = _halve_until(old, propose, R, st.m)
    if payload is None:
        return st
    cand, keep = payload
    if bool(keep.any()):
        sel = keep
        cand.S[sel], cand.cross[sel] = st.S[sel], st.cross[sel]
        cand.logdet_s[sel], cand.w[sel] = st.logdet_s[sel], st.w[sel]
    return cand


def _h_objective(G_terms, m, S, mu, K):
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
        return torch.full_like(value, -math.inf)
    return value - kl


def step_modulator_cov(data: TrialData, p: PLDSParams, st: VIState, pri: Priors) -> VIState:
    """Update the covariance of q(h[:, j]) for each latent dimension j in turn (the means
    move in :func:`step_means`).

    With expected rates ``Lam[r,i] = sum_t E[rate]`` the bound in q(h[:,j]) is
    ``sum_r G_r - KL`` (:func:`_h_objective`); the fixed-point proposal is
    ``S' = (K^-1 + diag(wj))^-1`` with ``wj[r] = sum_i c_ij^2 Lam[r,i]``, formed as
    ``K - K W^1/2 (I + W^1/2 K W^1/2)^-1 W^1/2 K`` (no K^-1), accepted along
    ``(1 - rho) S + rho S'`` with rho halved until the bound does not fall (it is concave
    in S).
    """
    if pri.hK is None:
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
        K, mu = pri.hK[j : j + 1], pri.hmu[j : j + 1]
        S_old = hS[j : j + 1]
        old = _h_objective(terms, m, S_old, mu, K)
        S_new = site_covariance(K[0], (Lam @ c**2)[:, 0])

        def propose(rho, S_old=S_old, S_new=S_new, terms=terms, m=m, mu=mu, K=K):
            S = S_old + rho[0] * (S_new[None] - S_old)
            return _h_objective(terms, m, S, mu, K), S

        _, S, _ = _halve_until(old, propose, 1, hm)
        # refresh the rates for the next dimension
        Lam = Lam * torch.exp(0.5 * (torch.diagonal(S, dim1=-2, dim2=-1) - v_ref).T @ (c.T**2))
        hS[j] = S[0]
    return replace(st, hS=hS)


def step_dynamics_drift(data: TrialData, p: PLDSParams, st: VIState, pri: Priors) -> VIState:
    """Exact update of q(g): the bound is quadratic in g given q(x), so
    ``gS = (K_g^-1 + diag(a))^-1``, ``gm = gS (K_g^-1 gmu + b)`` with
    ``a[r] = sum_t E[x_{t-1}' A1'Q^-1 A1 x_{t-1}]`` and
    ``b[r] = sum_t E[(x_t - A x_{t-1} - B u_t)' Q^-1 A1 x_{t-1}]``."""
    if pri.gK is None:
        return st
    a, b = _g_quadratic(data, p, st)
    K = pri.gK
    gS = site_covariance(K, a)
    # posterior mean of N(gmu, K) times exp(-a g^2/2 + b g): solve (K^-1 + diag a) m = K^-1 gmu + b
    gm = gS @ (torch.cholesky_solve(pri.gmu[:, None], torch.linalg.cholesky(K))[:, 0] + b)
    return replace(st, gm=gm, gS=gS)


def _path_stats(st: VIState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-trial sums of E[x_{t-1} x_{t-1}'], E[x_t x_{t-1}'], E[x_t x_t'] for t >= 1:
    each (R, k, k)."""
    m = st.m
    Ex = st.S + m[..., :, None] * m[..., None, :]
    S00 = Ex[:, :-1].sum(1)
    S11 = Ex[:, 1:].sum(1)
    S10 = (st.cross + m[:, 1:, :, None] * m[:, :-1, None, :]).sum(1)
    return S00, S10, S11


def _g_quadratic(data: TrialData, p: PLDSParams, st: VIState):
    Qi = torch.linalg.inv(p.Q)
    S00, S10, _ = _path_stats(st)
    QA1 = Qi @ p.A1
    a = (p.A1.T @ QA1 * S00).sum((-1, -2))  # tr(A1'Qi A1 S00)
    # E[r_t x_{t-1}'] = S10 - A S00 - B u_t m_{t-1}'
    Erx = S10 - p.A @ S00
    if data.u is not None and p.B is not None:
        b_in = data.u[:, 1:] @ p.B.T  # (R, T-1, k)
        Erx = Erx - b_in.mT @ st.m[:, :-1]
    b = (QA1 * Erx).sum((-1, -2))  # tr(A1' Qi Erx) = sum(Qi A1 * Erx)
    return a, b


# ----------------------------------------------------------------------------- M-steps


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
    V0 = 0.5 * (V0 + V0.T) + 1e-9 * torch.eye(k, dtype=V0.dtype, device=V0.device)
    S00, S10, S11 = _path_stats(st)
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
    Phi = 0.5 * (Phi + Phi.T)
    ridge = 1e-9 * torch.diagonal(Phi).mean() * torch.eye(len(Phi), dtype=Phi.dtype)
    W = torch.linalg.solve(Phi + ridge.to(Phi.device), Xphi.T).T
    Q = (S11.sum(0) - W @ Xphi.T) / (R * (T - 1))
    Q = 0.5 * (Q + Q.T)
    ev, U = torch.linalg.eigh(Q)
    Q = (U * torch.clamp(ev, min=1e-8 * ev.max().clamp(min=1e-12))) @ U.T
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
    MtMt = _outer_flat(Mt)
    Cd = torch.cat([p.C, p.d[:, None]], 1)  # (N, k+1)
    mask = data.mask
    W = data.weight.expand(R, T, N).reshape(R * T, N)  # 0 on missing bins

    def neuron_terms(Cd):
        C = Cd[:, :k]
        mean = Mt @ Cd.T
        log_lam = mean + 0.5 * (Vq @ _outer_flat(C).T)
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

        _, Cd, _ = _halve_until(old, propose, N, Cd)
    return replace(p, C=Cd[:, :k].contiguous(), d=Cd[:, k].contiguous())


def _site_posterior(K: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """``S = (K^-1 + diag w)^-1`` (:func:`site_covariance`) and ``m = S b`` per dimension
    (K (J, R, R); w, b (J, R))."""
    S = site_covariance(K, w)
    return (S @ b[..., None])[..., 0], S


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
    G = 0.5 * (G + G.mT)
    return -F, [-(G * dK).sum((-1, -2)) for dK in dKs]


def _kernel_step(kernel, theta, bounds, w, b, value, m0, S0, iters):
    """Move GP hyperparameters and their q together: with the site terms (w, b) fixed,
    ``q_theta = N(S b, S)``, ``S = (K_theta^-1 + diag w)^-1``, and L-BFGS-B maximises
    ``value(m, S) - KL(q_theta || N(0, K_theta))`` (:func:`_site_part`, with its gradient in
    closed form), the exact part of the bound that depends on them, within ``bounds`` (one
    ``(lo, hi)`` per hyperparameter vector). The result replaces the current (theta, q) only
    if that part of the bound rises. ``kernel(*theta) -> (K, [dK/dtheta_p])``. Returns
    (theta, m, S)."""
    import scipy.optimize

    sizes = [t.numel() for t in theta]
    like = theta[0]

    def unpack(x: np.ndarray) -> list[torch.Tensor]:
        parts = np.split(np.asarray(x, dtype=np.float64), np.cumsum(sizes)[:-1])
        return [torch.as_tensor(q, dtype=like.dtype, device=like.device) for q in parts]

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        K, dKs = kernel(*unpack(x))
        f, grads = _site_part(K, dKs, w, b, value)
        return float(f), torch.cat(grads).cpu().numpy()

    x0 = torch.cat([t.reshape(-1) for t in theta]).cpu().numpy()
    box = [lohi for lohi, n in zip(bounds, sizes, strict=True) for _ in range(n)]
    x0 = np.clip(x0, [lo for lo, _ in box], [hi for _, hi in box])
    with torch.no_grad():
        try:
            current = objective(x0)[0]
            res = scipy.optimize.minimize(
                objective,
                x0,
                jac=True,
                method="L-BFGS-B",
                bounds=box,
                options={"maxiter": iters},
            )
        except torch.linalg.LinAlgError:
            return theta, m0, S0
        if not (np.isfinite(res.fun) and res.fun < current):
            return theta, m0, S0
        new = [q.reshape(t.shape) for q, t in zip(unpack(res.x), theta, strict=True)]
        m, S = _site_posterior(kernel(*new)[0], w, b)
    return new, m, S


def mstep_kernels(
    data: TrialData, p: PLDSParams, st: VIState, iters: int = 10
) -> tuple[PLDSParams, VIState]:
    """GP hyperparameters by L-BFGS-B on their log, moving q(h) and q(g) with them
    (:func:`_kernel_step`); without that, q's covariance, shaped by the current kernel, pins
    the hyperparameters where they started.

    Sites for h: ``w[j, r] = sum_i c_ij^2 Lam[r, i]`` (the fixed point of the covariance step)
    and ``b = (K^-1 + W) hm`` (so the site q at the current kernel has the current means); the
    bound's h part is ``sum_{r,i} [Y c_i'h_r - Lam exp(c_i'(dm_r) + c_i^2'dv_r / 2)] - KL``.
    Sites for g are exact (the bound is quadratic in g): ``w = a``, ``b`` of
    :func:`step_dynamics_drift`. Length-scales stay within ``TAU_RANGE`` times the span of the
    trial numbers, variances within [1e-8, 1e3]. Returns the new parameters and q.
    """
    n = data.n
    span = float((n.max() - n.min()).clamp(min=1.0))
    lo_tau, hi_tau = math.log(TAU_RANGE[0]), math.log(TAU_RANGE[1] * span)
    if p.drift:
        y = data.y * data.weight
        Y = y.sum(1)  # (R, N)
        _, log_lam = expected_log_rate(p, st)
        Lam = (torch.exp(log_lam) * data.weight).sum(1)  # (R, N)
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
        a, bg = _g_quadratic(data, p, st)
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


# ----------------------------------------------------------------------------- initialisation


def _moment_covariances(
    y: torch.Tensor, mask_frac: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean counts mu (N,) and log-rate covariances at lags 0 and 1 (N, N) from the counts'
    moments under the Poisson model with Gaussian log-rates (Macke et al. 2011)::

        Sigma_0 = log(1 + (Cov(y_t) - diag(mu)) / (mu mu')),
        Sigma_1 = log(1 + Cov(y_{t+1}, y_t) / (mu mu'))

    pooled over trials and bins (missing bins, NaN, left out of each sum and its count);
    arguments of the log are floored at ``mask_frac``."""
    R, T, N = y.shape
    o = (~torch.isnan(y)).to(y.dtype)  # missing bins (NaN) are left out of every moment
    y = torch.nan_to_num(y, nan=0.0)
    mu = ((y * o).sum((0, 1)) / o.sum((0, 1)).clamp(min=1)).clamp(min=1e-3 / T)
    yc = ((y - mu) * o).reshape(R * T, N)
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
    return mu, 0.5 * (sig0 + sig0.T), sig1


def initial_params(
    y: np.ndarray | torch.Tensor,
    n: np.ndarray,
    k: int,
    *,
    drift: bool,
    dynamics_drift: bool = False,
    n_inputs: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> PLDSParams:
    """Deterministic start by moment matching of the Poisson log-rate covariances.

    With the latents' stationary covariance set to I: ``C = U_k Lambda_k^(1/2)`` from the
    top-k eigenpairs of Sigma_0 (:func:`_moment_covariances`), ``d = log mu - diag(C C') / 2``,
    ``A = C^+ Sigma_1 C^+'`` (spectral radius capped at 0.99), ``Q = I - A A'``, ``x0 = 0``,
    ``V0 = I``. GP variances start at a tenth of the latent variance, length-scales at a tenth
    of the span of trial numbers; the dynamics variant starts with ``A1 = 0.05 A`` (h and g
    start from the data in :func:`initial_state`).
    """
    R, T, N = y.shape
    if k > N:
        raise ValueError(f"latent dimension {k} exceeds the {N} neurons")
    yt = torch.as_tensor(y, dtype=dtype, device=device)
    mu, sig0, sig1 = _moment_covariances(yt)
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
    ev_q, Uq = torch.linalg.eigh(0.5 * (Q + Q.T))
    Q = (Uq * torch.clamp(ev_q, min=1e-2)) @ Uq.T
    p = PLDSParams(C=C, d=d, A=A, Q=Q, x0=torch.zeros(k, dtype=dtype, device=device), V0=eye)
    span = max(float(np.ptp(n)), 1.0)
    if n_inputs:
        p.B = torch.zeros((k, n_inputs), dtype=dtype, device=device)
    if drift:
        p.log_sigma2 = torch.full((k,), math.log(0.1), dtype=dtype, device=device)
        p.log_tau = torch.full((k,), math.log(max(span / 10.0, 1.0)), dtype=dtype, device=device)
    if dynamics_drift:
        p.A1 = 0.05 * A
        p.log_tau_g = torch.tensor(math.log(max(span / 10.0, 1.0)), dtype=dtype, device=device)
    return p


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
    data: TrialData, p: PLDSParams, pri: Priors, steps: int = 3, learn: bool = True
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
    if pri.gK is not None:
        gm, gS = pri.gmu.clone(), pri.gK.clone()
    mean, _ = prior_path_moments(p, R, T, data.u)
    hm, hS = zeros(R, k), zeros(k, R, R)
    if pri.hK is not None and not learn:
        hm, hS = pri.hmu.T.clone(), pri.hK.clone()
    st = VIState(
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
    prior = path_prior(p, R, T, data.u, *_g_moments(st))
    _, log_lam = expected_log_rate(p, st)
    w = torch.exp(log_lam) * data.weight
    S, cross, logdet_s = _paths_cov(prior, p.C, w)
    st = replace(st, S=S, cross=cross, logdet_s=logdet_s, w=w)
    for _ in range(steps):
        st = step_paths_mean(data, p, st, prior)
        st = step_paths_cov(data, p, st, prior)
    if pri.hK is not None and not learn:
        for _ in range(steps):
            st = estep(data, p, st, pri)
    elif pri.hK is not None:
        h = st.m.mean(1)
        st = replace(st, m=st.m - h[:, None, :], hm=h, hS=0.5 * pri.hK.clone())
        _, V = torch.linalg.eigh(h.T @ h)
        p, st = rotate(p, st, V.flip(1))
        for _ in range(steps):
            st = estep(data, p, st, pri)
    return p, st


# ----------------------------------------------------------------------------- the fit


#: Iterations over which the bound's rise is measured by the convergence test.
WINDOW = 10


def recent_gain(bound: list[float], window: int = WINDOW) -> float:
    """The bound's rise over the last ``window`` iterations (inf before there are that many).

    EM's increments can shrink for a while and grow again when the fit moves from one
    configuration to another (on real data this happens after hundreds of iterations), so one
    small step is no sign of convergence; ``window`` small steps in a row are."""
    if len(bound) <= window:
        return math.inf
    return float(bound[-1] - bound[-1 - window])


@dataclass
class FitResult:
    """A fitted model: params, the posterior over the training trials, the bound trace
    (one value per iteration, the initial state first), iterations, whether the convergence
    test held, seconds taken in all and per iteration (after the start), and how many SQUAREM
    extrapolations were kept."""

    params: PLDSParams
    state: VIState
    bound: list[float]
    iterations: int
    converged: bool
    seconds: float
    iteration_seconds: list[float] = field(default_factory=list)
    extrapolations: int = 0


def estep(data: TrialData, p: PLDSParams, st: VIState, pri: Priors) -> VIState:
    """One pass of every variational update (paths' means and covariances, h, g)."""
    R, T, _ = data.shape
    prior = path_prior(p, R, T, data.u, *_g_moments(st))
    st = step_means(data, p, st, prior, pri)
    st = step_paths_cov(data, p, st, prior)
    st = step_modulator_cov(data, p, st, pri)
    if pri.gK is not None:
        st = step_dynamics_drift(data, p, st, pri)
    return st


def em_iteration(
    data: TrialData, p: PLDSParams, st: VIState, pri: Priors
) -> tuple[PLDSParams, VIState, Priors, float]:
    """One EM iteration (E-step, then every M-step): new parameters, q, priors and bound."""
    st = estep(data, p, st, pri)
    p = mstep_dynamics(data, p, st)
    p = mstep_emissions(data, p, st)
    p, st = mstep_kernels(data, p, st)
    pri = training_priors(p, data.n)
    return p, st, pri, float(elbo(data, p, st, pri))


def fit(
    y: np.ndarray,
    n: np.ndarray | None = None,
    latent_dim: int = 3,
    *,
    drift: bool = True,
    dynamics_drift: bool = False,
    inputs: np.ndarray | None = None,
    max_iter: int = 3000,
    min_iter: int = 5,
    tol: float = 1e-6,
    device: str | torch.device = "cpu",
    init: PLDSParams | None = None,
    progress_every: int = 10,
    accelerate: bool = True,
) -> FitResult:
    """Fit the (non-stationary) Poisson LDS by variational EM (module docstring).

    y: (R, T, N) spike counts, NaN where a bin is missing (trials of unequal length padded,
    bins outside a trial): every term of the bound skips them; n: (R,) trial numbers
    (default 0..R-1); latent_dim: k;
    drift: fit the GP modulator h (False gives the stationary PLDS); dynamics_drift: also fit
    ``A[r] = A + g[r] A1``; inputs: (R, T, m) known inputs u. Stops when the bound rose by
    at most ``tol * |bound|`` over the last ``WINDOW`` iterations (:func:`recent_gain`),
    after ``min_iter`` iterations, or at ``max_iter``. With ``accelerate`` every two EM
    iterations are extrapolated by SQUAREM (:mod:`._accelerate`) and the extrapolation is
    kept only when, after one more iteration, the bound is at least that of the plain EM
    step; ``max_iter`` and the trace count EM iterations either way.
    Deterministic: the same data give the same fit.
    """
    y = np.asarray(y)
    if y.ndim != 3:
        raise ValueError(f"counts must be (trials, time, neurons), got shape {y.shape}")
    if np.any(np.isinf(y)) or np.any(y < 0):
        raise ValueError("counts must be finite and non-negative (NaN marks a missing bin)")
    silent = np.flatnonzero(np.nansum(y, (0, 1)) == 0)
    if len(silent):
        raise ValueError(
            f"neurons {silent.tolist()[:10]} have no spikes: their rate's maximum-likelihood "
            "log is -inf; leave them out"
        )
    R, T, N = y.shape
    n = np.arange(R, dtype=np.float64) if n is None else np.asarray(n, dtype=np.float64)
    if n.shape != (R,):
        raise ValueError(f"{R} trials but {n.shape} trial numbers")
    if len(np.unique(n)) != R:
        raise ValueError("trial numbers must be distinct")
    t0 = time.perf_counter()
    tt = lambda a: torch.as_tensor(a, dtype=torch.float64, device=device)  # noqa: E731
    data = TrialData(tt(y), tt(n), None if inputs is None else tt(inputs))
    p = init
    if p is None:
        p = initial_params(
            tt(y),  # with its NaN: the start's moments skip missing bins
            n,
            latent_dim,
            drift=drift,
            dynamics_drift=dynamics_drift,
            n_inputs=0 if inputs is None else np.asarray(inputs).shape[-1],
            device=device,
        )
    pri = training_priors(p, data.n)
    p, st = initial_state(data, p, pri)
    bound = [float(elbo(data, p, st, pri))]
    converged = False
    it = 0
    per_iteration: list[float] = []
    accepted = 0

    def rebuild(pn: PLDSParams, sn: VIState) -> VIState:
        prior = path_prior(pn, R, T, data.u, *_g_moments(sn))
        S, cross, logdet_s = _paths_cov(prior, pn.C, sn.w)
        return replace(sn, S=S, cross=cross, logdet_s=logdet_s)

    # numpy/scipy work on tiny arrays here (the kernel step's L-BFGS-B); OpenBLAS's idle
    # worker threads spinning beside torch's OpenMP threads halve the speed of every torch op
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        while it < max_iter:
            t_it = time.perf_counter()
            p0, st0 = p, st  # the iterate an extrapolation starts from
            p1, st1, pri1, b1 = em_iteration(data, p, st, pri)
            steps = [b1]
            p, st, pri = p1, st1, pri1
            if accelerate and it + 3 <= max_iter:
                p2, st2, pri2, b2 = em_iteration(data, p1, st1, pri1)
                steps.append(b2)
                p, st, pri = p2, st2, pri2
                pe, se, a = extrapolate(p0, st0, p1, st1, p2, st2, rebuild)
                if pe is not None and a < -1:
                    p3, st3, pri3, b3 = em_iteration(data, pe, se, training_priors(pe, data.n))
                    if math.isfinite(b3) and b3 >= b2:
                        p, st, pri, accepted = p3, st3, pri3, accepted + 1
                        steps.append(b3)
                    else:
                        steps.append(b2)  # rejected: the EM step t2 stands
            bound += steps
            it += len(steps)
            per_iteration += [(time.perf_counter() - t_it) / len(steps)] * len(steps)
            change = bound[-1] - bound[-1 - len(steps)]
            remaining = recent_gain(bound)
            if progress_every and (
                it // progress_every > (it - len(steps)) // progress_every or it <= 3
            ):
                log.info(
                    "iteration %d / at most %d, %.1f s: bound %.6g (change %.3g, %.3g over the "
                    "last %d)",
                    it,
                    max_iter,
                    time.perf_counter() - t0,
                    bound[-1],
                    change,
                    remaining,
                    WINDOW,
                )
            if it >= min_iter and remaining <= tol * abs(bound[-1]):
                converged = True
                break
    seconds = time.perf_counter() - t0
    log.info(
        "%s after %d iterations, %.1f s: bound %.8g%s",
        "converged" if converged else "stopped at nplds.max_iter",
        it,
        seconds,
        bound[-1],
        f" ({accepted} SQUAREM extrapolations kept)" if accelerate else "",
    )
    return FitResult(p, st, bound, it, converged, seconds, per_iteration, accepted)
