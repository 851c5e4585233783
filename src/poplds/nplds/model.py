"""The N-PLDS model: parameters, trial data, the variational state, GP kernels and priors,
the path prior of the latent dynamics and the evidence lower bound (:func:`elbo`).

The model, the variational family and the bound are written out in :mod:`poplds.nplds.vi`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .._errors import InputError
from .._linalg import sym
from . import _blocktri as bt
from ._numerics import gaussian_kl, quad_diag

#: Relative nugget added to every GP kernel's diagonal.
NUGGET = 1e-6


#: Bounds of the GP length-scales: the lower in trials (the default of the slowest
#: modulator called drift), the upper in units of the span of trial numbers.
TAU_RANGE = (0.5, 10.0)


@dataclass
class PLDSParams:
    """Parameters of the (non-stationary) Poisson LDS (float64 tensors).

    C: (N, k); d: (N,) log rate per bin at zero latent; A, Q, V0: (k, k); x0: (k,);
    B: (k, m) input weights or None; log_sigma2, log_tau: (k,) GP hyperparameters of h, or None
    for the stationary model; A1: (k, k) direction of the dynamics drift and log_tau_g: ()
    its GP length-scale, or None without the dynamics variant.

    The time-in-trial offset ``f[:, i] ~ GP(0, K_i)`` over bins
    (``K_i[t, s] = sf2_i exp(-(t - s)^2 / (2 lf^2))``, t in bins; a variance per neuron, one
    smoothness for all) is a global latent: its variational posterior
    ``q(f[:, i]) = N(f_mean[:, i], f_cov[i])`` travels with the parameters, so that held-out
    trials use it as it is. f_mean: (T, N); f_cov: (N, T, T); log_sf2: (N,), log_lf: () its
    hyperparameters; all None without the offset.

    The neurons' own drift ``e[:, i] ~ GP(0, se2_i K_le)`` over trial numbers (a variance per
    neuron, one length-scale): log_se2 (N,), log_le (); None without it. Its q lives in
    :class:`VIState` (it differs between trials).
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
    f_mean: torch.Tensor | None = None
    f_cov: torch.Tensor | None = None
    log_sf2: torch.Tensor | None = None
    log_lf: torch.Tensor | None = None
    log_se2: torch.Tensor | None = None
    log_le: torch.Tensor | None = None

    @property
    def neuron_drift(self) -> bool:
        """True with the neurons' own drift e over trials."""
        return self.log_se2 is not None

    def neuron_drift_unit_kernel(self, n: torch.Tensor) -> torch.Tensor:
        """(R, R) the kernel of e over trial numbers n (R,) at unit variance (with the nugget)."""
        return se_kernel(n, n.new_ones(1), torch.exp(self.log_le).reshape(1))[0]

    @property
    def offset(self) -> bool:
        """True with the time-in-trial offset f."""
        return self.f_mean is not None

    @property
    def f_var(self) -> torch.Tensor:
        """(T, N) marginal variances of q(f)."""
        return torch.diagonal(self.f_cov, dim1=-2, dim2=-1).T

    def offset_unit_kernel(self) -> torch.Tensor:
        """(T, T) the offset's GP kernel over bins 0..T-1 at unit variance (with the nugget)."""
        t = torch.arange(self.f_mean.shape[0], dtype=self.f_mean.dtype, device=self.f_mean.device)
        return se_kernel(t, t.new_ones(1), torch.exp(self.log_lf).reshape(1))[0]

    def offset_kernel(self) -> torch.Tensor:
        """(N, T, T) every neuron's offset kernel ``K_i = sf2_i K_unit``."""
        return torch.exp(self.log_sf2)[:, None, None] * self.offset_unit_kernel()

    def offset_log_rate(self) -> torch.Tensor | float:
        """(T, N) ``log E[exp(f)] = f_mean + f_var / 2`` (0 without the offset)."""
        return self.f_mean + 0.5 * self.f_var if self.offset else 0.0

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
        raise InputError("counts", "trials need at least 2 bins")
    k = p.A.shape[0]
    Qi = torch.linalg.inv(p.Q)
    Qi = sym(Qi)
    V0i = torch.linalg.inv(p.V0)
    V0i = sym(V0i)
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
    D = sym(D)
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


@dataclass
class VIState:
    """Variational posterior (module docstring) over R trials of T bins.

    m: (R, T, k); S: (R, T, k, k); cross: (R, T-1, k, k) ``cov(x[t+1], x[t])``; logdet_s: (R,)
    log det of each trial's path covariance; w: (R, T, N) site precisions defining S;
    hm: (R, k); hS: (k, R, R); gm: (R,); gS: (R, R); em: (R, N), eS: (N, R, R) q of the
    neurons' own drift e (None without it).
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
    em: torch.Tensor | None = None
    eS: torch.Tensor | None = None

    @property
    def hv(self) -> torch.Tensor:
        """(R, k) marginal variances of h."""
        return torch.diagonal(self.hS, dim1=-2, dim2=-1).T

    @property
    def ev(self) -> torch.Tensor:
        """(R, N) marginal variances of e."""
        return torch.diagonal(self.eS, dim1=-2, dim2=-1).T


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
class GPPriors:
    """GP priors of h and g over the trials being inferred: means hmu (k, R), gmu (R,) and
    covariances hK (k, R, R), gK (R, R). In training they are the GP priors (zero mean); for
    held-out trials, the GP conditionals given the training trials' q, which also give e's:
    emu (N, R), eK (N, R, R) (None in training: e's prior is formed from the parameters)."""

    hmu: torch.Tensor | None
    hK: torch.Tensor | None
    gmu: torch.Tensor | None = None
    gK: torch.Tensor | None = None
    emu: torch.Tensor | None = None
    eK: torch.Tensor | None = None


def gp_priors(p: PLDSParams, n: torch.Tensor) -> GPPriors:
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
    return GPPriors(hmu, hK, gmu, gK)


def expected_log_rate(p: PLDSParams, st: VIState) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (R, T, N) of ``eta = c'(x + h) + d + f[t] + e[r]`` and ``log E[exp(eta)]``
    under q."""
    mean = (st.m + st.hm[:, None, :]) @ p.C.T + p.d
    var = quad_diag(p.C, st.S).reshape(mean.shape) + (st.hv @ (p.C**2).T)[:, None, :]
    if p.offset:
        mean = mean + p.f_mean
        var = var + p.f_var
    if st.em is not None:
        mean = mean + st.em[:, None, :]
        var = var + st.ev[:, None, :]
    return mean, mean + 0.5 * var


def expected_loglik(data: TrialData, mean: torch.Tensor, log_lam: torch.Tensor) -> torch.Tensor:
    """(R,) ``sum_{t,i} mask_i (y eta_mean - E[exp(eta)])`` (without log y!)."""
    return ((data.y * mean - torch.exp(log_lam)) * data.weight).sum((-1, -2))


def trial_objective(data: TrialData, p: PLDSParams, prior: PathPrior, st: VIState) -> torch.Tensor:
    """(R,) the part of the bound that depends on trial r's q(x_r)."""
    mean, log_lam = expected_log_rate(p, st)
    return expected_loglik(data, mean, log_lam) + prior.value(st.m, st.S, st.cross, st.logdet_s)


def elbo(data: TrialData, p: PLDSParams, st: VIState, gp: GPPriors) -> torch.Tensor:
    """The evidence lower bound (module docstring), a float64 scalar."""
    R, T, _ = data.shape
    prior = path_prior(p, R, T, data.u, *g_moments(st))
    value = trial_objective(data, p, prior, st).sum() - data.lgamma
    if gp.hK is not None:
        value = value - gaussian_kl(st.hm.T, st.hS, gp.hmu, gp.hK).sum()
    if gp.gK is not None:
        value = value - gaussian_kl(st.gm[None], st.gS[None], gp.gmu[None], gp.gK[None]).sum()
    if p.offset:
        value = value - offset_kl(p.f_mean.T, p.f_cov, p.log_sf2, p.offset_unit_kernel()).sum()
    if st.em is not None:
        if gp.eK is not None:
            kl_e = gaussian_kl(st.em.T, st.eS, gp.emu, gp.eK)
        else:
            kl_e = offset_kl(st.em.T, st.eS, p.log_se2, p.neuron_drift_unit_kernel(data.n))
        value = value - kl_e.sum()
    return value


def offset_kl(
    m: torch.Tensor, S: torch.Tensor, log_s2: torch.Tensor, K1: torch.Tensor
) -> torch.Tensor:
    """(J,) ``KL(N(m_j, S_j) || N(0, s2_j K1))``: m (J, T), S (J, T, T), log_s2 (J,), K1
    (T, T) (:func:`~poplds.nplds._numerics.gaussian_kl` with K1 factored once)."""
    Lk = torch.linalg.cholesky(K1)
    Ls = torch.linalg.cholesky(S)
    s2 = torch.exp(log_s2)
    a = torch.linalg.solve_triangular(Lk, m.T, upper=False)  # (T, J)
    B = torch.linalg.solve_triangular(Lk, Ls, upper=False)
    T = m.shape[-1]
    logdet_k = 2 * torch.log(torch.diagonal(Lk)).sum() + T * log_s2
    logdet_s = 2 * torch.log(torch.diagonal(Ls, dim1=-2, dim2=-1)).sum(-1)
    quad = ((B**2).sum((-1, -2)) + (a**2).sum(0)) / s2
    return 0.5 * (quad - T + logdet_k - logdet_s)


def g_moments(st: VIState) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if st.gm is None:
        return None, None
    return st.gm, torch.diagonal(st.gS)
