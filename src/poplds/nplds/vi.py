"""Variational EM for the hierarchical (non-stationary) Poisson LDS over trials.

Model, for trial r (trial number ``n_r``), bin t, neuron i, latents k::

    y[r,t,i] ~ Poisson(exp(c_i'(x[r,t] + h[r]) + d_i + f[t,i]))
    x[r,0] ~ N(x0, V0),   x[r,t] = A[r] x[r,t-1] + B u[r,t] + w,   w ~ N(0, Q)
    h[:,j] ~ GP(0, K_j),  K_j[r,s] = sigma2_j exp(-(n_r - n_s)^2 / (2 tau_j^2))   (j = 1..k)
    A[r] = A + g[r] A1,   g ~ GP(0, K_g),  K_g: variance 1, length-scale tau_g   (variant)

    f[:,i] ~ GP(0, K_f),  K_f[t,s] = sf2_i exp(-(t - s)^2 / (2 lf^2))   (bins; optional)
    e[:,i] ~ GP(0, K_e),  K_e[r,s] = se2_i exp(-(n_r - n_s)^2 / (2 le^2))  (optional)

with ``e[r,i]`` added to the log rate: each neuron's own slow drift beside the shared h.

The stationary PLDS is ``h = 0`` and ``A[r] = A``. The time-in-trial offset f (one smooth
log-rate profile per neuron, locked to the trial's start; its smoothness ``lf`` and size ``sf2``
learned) lets both models nest the PSTH: with ``C = 0`` the rate is ``exp(d_i + f[t,i])``.
Every kernel carries a nugget ``1e-6 sigma2`` on its diagonal (part of the model, for a
stable Cholesky factor).

Variational family ``q = prod_r q(x_r) prod_j q(h[:,j]) q(g) prod_i q(f[:,i]) q(e[:,i])``,
all Gaussian (``q(f[:,i]) = N(f_mean[:,i], f_cov[i])`` kept with the parameters, since
held-out trials share f; ``q(e[:,i]) = N(em[:,i], eS[i])`` over trials, like q(h)):

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
variances of h), since ``E[exp(c'z)] = exp(c' mu + c' Sigma c / 2)`` for Gaussian z; with the
offset, ``f_mean[t,i]`` joins the mean, ``f_cov[i][t,t]`` the variance, and
``- sum_i KL(q(f[:,i]) || N(0, K_f))`` the bound.

Each EM iteration takes, in turn, a Newton step in m (Hessian
``Jbar + blockdiag(C' diag(lambda) C)``, block-tridiagonal, batched over trials), the
fixed-point step ``w <- lambda`` (expected rates) for S, a Newton/fixed-point step for each
``q(h[:,j])``, the exact update of ``q(g)``, then the M-step: closed forms for x0, V0, A, A1, B,
Q; per-neuron Newton steps for (c_i, d_i); a Newton/fixed-point step for each q(f[:,i]);
L-BFGS-B on the kernels' log hyperparameters. Every
step that is not an exact maximiser is damped (halved per trial, neuron or dimension) until the
bound does not fall, so the bound never decreases. Iteration stops when the bound rose by less
than ``tol * |bound|`` over the last ``WINDOW`` (10) iterations: a slow phase of EM, whose
increments shrink for a while and then grow again, is not taken for convergence.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import threadpoolctl
import torch

from .._checkpoint import Checkpointer, fingerprint
from .._errors import InputError
from .._logging import get_logger
from ._accelerate import extrapolate
from ._numerics import counting_guards, counting_skipped_steps
from .estep import estep, paths_cov
from .init import initial_params, initial_state
from .model import (
    TAU_RANGE,
    GPPriors,
    PLDSParams,
    TrialData,
    VIState,
    elbo,
    g_moments,
    gp_priors,
    path_prior,
)
from .mstep import (
    mstep_dynamics,
    mstep_emissions,
    mstep_kernels,
    mstep_neuron_drift,
    mstep_offset,
)
from .settings import NPLDSSettings

log = get_logger()


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
    extrapolations were kept; skipped_steps: per step, how often it kept its current value
    after a numerical failure (a Cholesky factor that did not exist); guards: how often each
    numerical guard changed a result (``psd_floor``: eigenvalues of Q raised to the floor)."""

    params: PLDSParams
    state: VIState
    bound: list[float]
    iterations: int
    converged: bool
    seconds: float
    iteration_seconds: list[float] = field(default_factory=list)
    extrapolations: int = 0
    skipped_steps: dict[str, int] = field(default_factory=dict)
    guards: dict[str, int] = field(default_factory=dict)


def _plain(obj) -> dict:
    """A dataclass of tensors as a dict of CPU tensors (for a checkpoint)."""
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in vars(obj).items()}


def _restore(cls, fields: dict, device):
    """The dataclass ``cls`` from :func:`_plain`'s dict, its tensors on ``device``."""
    return cls(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()})


def em_iteration(
    data: TrialData, p: PLDSParams, st: VIState, gp: GPPriors, min_tau: float = TAU_RANGE[0]
) -> tuple[PLDSParams, VIState, GPPriors, float]:
    """One EM iteration (E-step, then every M-step): new parameters, q, priors and bound;
    ``min_tau``: the GP length-scales' lower bound in trials."""
    st = estep(data, p, st, gp)
    p = mstep_dynamics(data, p, st)
    p = mstep_emissions(data, p, st)
    p = mstep_offset(data, p, st)
    p, st = mstep_neuron_drift(data, p, st, min_tau=min_tau)
    p, st = mstep_kernels(data, p, st, min_tau=min_tau)
    gp = gp_priors(p, data.n)
    return p, st, gp, float(elbo(data, p, st, gp))


def _checked(y: np.ndarray, n: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The counts (R, T, N) and trial numbers (R,) float64 (default 0..R-1), checked:
    non-negative, finite where not missing, every neuron with a spike, distinct trial
    numbers."""
    y = np.asarray(y)
    if y.ndim != 3:
        raise InputError("counts", f"must be (trials, time, neurons), got shape {y.shape}")
    if np.any(np.isinf(y)) or np.any(y < 0):
        raise InputError("counts", "must be finite and non-negative (NaN marks a missing bin)")
    silent = np.flatnonzero(np.nansum(y, (0, 1)) == 0)
    if len(silent):
        raise InputError(
            "counts",
            f"neurons {silent.tolist()[:10]} have no spikes: their rate's maximum-likelihood "
            "log is -inf; leave them out",
        )
    R = y.shape[0]
    n = np.arange(R, dtype=np.float64) if n is None else np.asarray(n, dtype=np.float64)
    if n.shape != (R,):
        raise InputError("trial numbers", f"{R} trials but {n.shape} trial numbers")
    if len(np.unique(n)) != R:
        raise InputError("trial numbers", "must be distinct")
    return y, n


def _cycle(data, p, st, gp, accelerate: bool, rebuild, min_tau: float = TAU_RANGE[0]):
    """One EM cycle from ``(p, st, gp)``: one EM iteration, or with ``accelerate`` two and a
    SQUAREM extrapolation from them, kept when one EM iteration from it reaches at least the
    second iteration's bound. Returns the new ``(p, st, gp)``, the bound after each EM
    iteration of the cycle, and 1 when the extrapolation was kept (else 0)."""
    p0, st0 = p, st  # the iterate an extrapolation starts from
    p1, st1, gp1, b1 = em_iteration(data, p, st, gp, min_tau)
    steps = [b1]
    p, st, gp = p1, st1, gp1
    if not accelerate:
        return p, st, gp, steps, 0
    p2, st2, gp2, b2 = em_iteration(data, p1, st1, gp1, min_tau)
    steps.append(b2)
    p, st, gp = p2, st2, gp2
    pe, se, a = extrapolate(p0, st0, p1, st1, p2, st2, rebuild)
    if pe is not None and a < -1:
        p3, st3, gp3, b3 = em_iteration(data, pe, se, gp_priors(pe, data.n), min_tau)
        if math.isfinite(b3) and b3 >= b2:
            steps.append(b3)
            return p3, st3, gp3, steps, 1
        steps.append(b2)  # rejected: the EM step t2 stands
    return p, st, gp, steps, 0


def fit(
    y: np.ndarray,
    n: np.ndarray | None = None,
    latent_dim: int = 3,
    *,
    drift: bool = True,
    dynamics_drift: bool = False,
    offset: bool = False,
    neuron_drift: bool = False,
    min_drift_trials: float = TAU_RANGE[0],
    inputs: np.ndarray | None = None,
    max_iter: int = NPLDSSettings.max_iter,
    min_iter: int = 5,
    tol: float = NPLDSSettings.tol,
    device: str | torch.device = "cpu",
    init: PLDSParams | None = None,
    progress_every: int = 10,
    accelerate: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every_s: float = 60.0,
) -> FitResult:
    """Fit the (non-stationary) Poisson LDS by variational EM (module docstring).

    y: (R, T, N) spike counts, NaN where a bin is missing (trials of unequal length padded,
    bins outside a trial): every term of the bound skips them; n: (R,) trial numbers
    (default 0..R-1); latent_dim: k;
    drift: fit the GP modulator h (False gives the stationary PLDS); dynamics_drift: also fit
    ``A[r] = A + g[r] A1``; offset: fit the time-in-trial offset f; neuron_drift (with drift):
    also fit each neuron's own drift e over trials; min_drift_trials: the
    GP length-scales' lower bound in trial numbers (slower is drift; faster is left to the
    trial-to-trial variability of the paths); inputs: (R, T, m) known
    inputs u (``u[r, t]`` drives ``x[r, t]`` through B). Stops when the bound rose by
    at most ``tol * |bound|`` over the last ``WINDOW`` iterations (:func:`recent_gain`),
    after ``min_iter`` iterations, or at ``max_iter``. With ``accelerate`` every two EM
    iterations are extrapolated by SQUAREM (:mod:`._accelerate`) and the extrapolation is
    kept only when, after one more iteration, the bound is at least that of the plain EM
    step; ``max_iter`` and the trace count EM iterations either way.
    checkpoint: a file where the fit's state is saved every ``checkpoint_every_s`` seconds
    (at the end of an EM cycle) and when it ends; a fit started again with the same data,
    settings and file continues from it (or returns its result when it had ended) and
    reaches the same fit as one never interrupted.
    Deterministic: the same data give the same fit.

    Long by choice: the EM loop, the state it checkpoints and restores, and its stopping
    rule stay in one place, so that what is saved is visibly what the loop carries.
    """
    y, n = _checked(y, n)
    R, T, N = y.shape
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
            offset=offset,
            neuron_drift=neuron_drift and drift,
            device=device,
        )
    saver = Checkpointer(
        checkpoint,
        ""
        if checkpoint is None
        else fingerprint(
            y,
            n,
            *([] if inputs is None else [np.asarray(inputs)]),
            *([] if init is None else [t for t in vars(init).values() if t is not None]),
            latent_dim=latent_dim,
            drift=drift,
            dynamics_drift=dynamics_drift,
            offset=offset,
            neuron_drift=neuron_drift,
            min_drift_trials=min_drift_trials,
            max_iter=max_iter,
            min_iter=min_iter,
            tol=tol,
            accelerate=accelerate,
            device=str(device),
        ),
        checkpoint_every_s,
    )
    saved = saver.load()
    with (
        counting_skipped_steps() as skipped_steps,  # numerical failures, reported
        counting_guards() as guards,
    ):
        if saved is None:
            gp = gp_priors(p, data.n)
            p, st = initial_state(data, p, gp)
            bound = [float(elbo(data, p, st, gp))]
            converged, it, accepted = False, 0, 0
            per_iteration: list[float] = []
        else:
            p = _restore(PLDSParams, saved["params"], device)
            st = _restore(VIState, saved["state"], device)
            gp = gp_priors(p, data.n)
            bound, it, per_iteration = saved["bound"], saved["it"], saved["iteration_seconds"]
            converged, accepted = saved["converged"], saved["accepted"]
            skipped_steps.update(saved["skipped_steps"])
            guards.update(saved.get("guards", {}))

        def snapshot(done: bool) -> dict:
            return {
                "params": _plain(p),
                "state": _plain(st),
                "bound": bound,
                "it": it,
                "iteration_seconds": per_iteration,
                "converged": converged,
                "accepted": accepted,
                "skipped_steps": dict(skipped_steps),
                "guards": dict(guards),
                "done": done,
            }

        def rebuild(pn: PLDSParams, sn: VIState) -> VIState:
            prior = path_prior(pn, R, T, data.u, *g_moments(sn))
            S, cross, logdet_s = paths_cov(prior, pn.C, sn.w)
            return replace(sn, S=S, cross=cross, logdet_s=logdet_s)

        # numpy/scipy work on tiny arrays here (the kernel step's L-BFGS-B); OpenBLAS's idle
        # worker threads spinning beside torch's OpenMP threads halve the speed of every torch op
        with threadpoolctl.threadpool_limits(1, user_api="blas"):
            while it < max_iter and not (saved and saved["done"]):
                t_it = time.perf_counter()
                p, st, gp, steps, kept = _cycle(
                    data, p, st, gp, accelerate and it + 3 <= max_iter, rebuild, min_drift_trials
                )
                accepted += kept
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
                saver.save(snapshot(done=False))
        saver.save(snapshot(done=True), force=True)
    seconds = time.perf_counter() - t0
    log.info(
        "%s after %d iterations, %.1f s: bound %.8g%s",
        "converged" if converged else "stopped at nplds.max_iter",
        it,
        seconds,
        bound[-1],
        f" ({accepted} SQUAREM extrapolations kept)" if accelerate else "",
    )
    if skipped_steps:
        log.warning("steps skipped after a numerical failure: %s", dict(skipped_steps))
    return FitResult(
        p,
        st,
        bound,
        it,
        converged,
        seconds,
        per_iteration,
        accepted,
        dict(skipped_steps),
        {"psd_floor": guards["psd_floor"]},
    )
