"""Seeded ground-truth datasets for the demo, the tests and the benchmarks.

Two generative models:

**Stitched LDS** (the model of Nonnenmacher, Turaga & Macke 2017)::

    x[t+1] = A x[t] + w[t],   w ~ N(0, Q)            x: (time, latents)
    y[t]   = C x[t] + v[t],   v ~ N(0, diag(R))      y: (time, neurons)
    Pi     = A Pi A' + Q      (stationary latent covariance; x[0] ~ N(0, Pi))

``A = U blockdiag(rho_j R(theta_j)) U'`` with ``U`` a random orthogonal matrix, so its
eigenvalues are ``rho_j exp(±i theta_j)`` with moduli ``rho_j`` drawn from ``eig_moduli``.
``R_i = noise_to_signal * (C Pi C')_ii``. One latent trajectory runs through all recordings,
each recording observing its own neuron subset over its own consecutive time span.

**Poisson LDS over trials with slow drift** (Park, Bohner & Macke 2015)::

    x[r,0] ~ N(0, Pi),  x[r,t] = A x[r,t-1] + w,  w ~ N(0, Q)       within trial r
    h[:, j] ~ GP(0, sigma2 exp(-(n_r - n_s)^2 / (2 tau^2)))         across trial numbers n_r
    y[r,t,i] ~ Poisson(exp(c_i' (x[r,t] + h[r]) + d_i))

Everything is drawn from ``numpy.random.default_rng(seed)``; the same arguments give the same
arrays on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import scipy.linalg

from ._errors import InputError
from ._linalg import sym
from .stitched.models import StitchedLDSParams


@dataclass(frozen=True)
class SimRecording:
    """Layout of one simulated recording.

    name: recording name; neurons: ``(first, stop)`` half-open range of global neuron indices;
    n_time: number of time steps (consecutive after the previous recording's span).
    """

    name: str
    neurons: tuple[int, int]
    n_time: int


def random_dynamics(
    latent_dim: int,
    eig_moduli: tuple[float, float],
    rng: np.random.Generator,
    max_angle: float = np.pi / 4,
) -> np.ndarray:
    """A random (latents, latents) matrix with complex eigenvalue pairs of moduli in
    ``eig_moduli`` and angles in ``(0.05, max_angle)`` (one real eigenvalue if odd)."""
    lo, hi = eig_moduli
    if not 0 < lo <= hi < 1:
        raise InputError("simulate.eig_moduli", f"must satisfy 0 < lo <= hi < 1, got {eig_moduli}")
    blocks = []
    for _ in range(latent_dim // 2):
        rho, theta = rng.uniform(lo, hi), rng.uniform(0.05, max_angle)
        c, s = rho * np.cos(theta), rho * np.sin(theta)
        blocks.append(np.array([[c, -s], [s, c]]))
    if latent_dim % 2:
        blocks.append(np.array([[rng.uniform(lo, hi)]]))
    D = scipy.linalg.block_diag(*blocks)
    U, _ = np.linalg.qr(rng.standard_normal((latent_dim, latent_dim)))
    return U @ D @ U.T


def stationary_covariance(A: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """Solve ``Pi = A Pi A' + Q`` (discrete Lyapunov equation), symmetrised."""
    Pi = scipy.linalg.solve_discrete_lyapunov(A, Q)
    return sym(Pi)


def random_stitched_lds(
    n_neurons: int,
    latent_dim: int,
    *,
    eig_moduli: tuple[float, float] = (0.9, 0.99),
    noise_to_signal: float = 1.0,
    seed: int = 0,
) -> StitchedLDSParams:
    """Ground-truth parameters of a stitched LDS (see the module docstring)."""
    rng = np.random.default_rng(seed)
    A = random_dynamics(latent_dim, eig_moduli, rng)
    Q = np.eye(latent_dim)
    Pi = stationary_covariance(A, Q)
    # scale so every latent has unit stationary variance on average
    scale = np.sqrt(np.trace(Pi) / latent_dim)
    Q, Pi = Q / scale**2, Pi / scale**2
    C = rng.standard_normal((n_neurons, latent_dim)) / np.sqrt(latent_dim)
    signal = np.einsum("ik,kl,il->i", C, Pi, C)
    R = noise_to_signal * signal
    return StitchedLDSParams(A=A, C=C, Q=Q, R=R, Pi=Pi)


def sample_lds_latents(
    A: np.ndarray, Q: np.ndarray, Pi: np.ndarray, n_time: int, rng: np.random.Generator
) -> np.ndarray:
    """A stationary latent path (time, latents) with ``x[0] ~ N(0, Pi)``."""
    n = A.shape[0]
    x = np.empty((n_time, n))
    x[0] = np.linalg.cholesky(Pi + 1e-12 * np.eye(n)) @ rng.standard_normal(n)
    w = rng.standard_normal((n_time, n)) @ np.linalg.cholesky(Q).T
    for t in range(1, n_time):
        x[t] = A @ x[t - 1] + w[t]
    return x


def simulate_stitched(
    params: StitchedLDSParams,
    layout: Sequence[SimRecording],
    *,
    seed: int = 0,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Sample each recording's activity (time, neurons_r) from one latent path.

    Returns ``(activities, latents)``: one float64 array per recording and the whole latent
    path (sum of n_time, latents).
    """
    rng = np.random.default_rng([seed, 1])
    n_total = params.C.shape[0]
    for rec in layout:
        lo, hi = rec.neurons
        if not 0 <= lo < hi <= n_total or rec.n_time < 1:
            raise InputError(
                f"simulate recording {rec.name}", f"neurons {rec.neurons}, n_time {rec.n_time}"
            )
    x = sample_lds_latents(params.A, params.Q, params.Pi, sum(r.n_time for r in layout), rng)
    out, t0 = [], 0
    for rec in layout:
        lo, hi = rec.neurons
        xs = x[t0 : t0 + rec.n_time]
        noise = rng.standard_normal((rec.n_time, hi - lo)) * np.sqrt(params.R[lo:hi])
        out.append(xs @ params.C[lo:hi].T + noise)
        t0 += rec.n_time
    return out, x


def overlapping_layout(
    n_neurons: int, n_recordings: int, overlap: int, n_time: int
) -> list[SimRecording]:
    """Contiguous neuron blocks of equal size where neighbours share ``overlap`` neurons."""
    size = (n_neurons + (n_recordings - 1) * overlap) // n_recordings
    layout = []
    for r in range(n_recordings):
        lo = r * (size - overlap)
        hi = n_neurons if r == n_recordings - 1 else lo + size
        layout.append(SimRecording(f"s{r + 1}", (lo, hi), n_time))
    return layout


def write_stitched_simulation(
    out_dir: str | Path,
    *,
    n_neurons: int,
    latent_dim: int,
    recordings: Sequence[SimRecording | dict[str, Any]],
    eig_moduli: tuple[float, float] = (0.9, 0.99),
    noise_to_signal: float = 1.0,
    rate_hz: float = 10.0,
    seed: int = 0,
) -> list[Path]:
    """Simulate a stitched LDS and write ``<name>.npz`` per recording plus ``truth.npz``.

    Recording files follow the npz source format (``activity`` float32 (time, neurons),
    ``neuron_ids`` ``n<index>``, ``rate_hz``). ``truth.npz`` holds ``A, C, Q, R, Pi``, the
    latent path ``x`` and ``neuron_ids``. Returns the recording files in layout order.
    """
    layout = [r if isinstance(r, SimRecording) else _sim_recording(r) for r in recordings]
    params = random_stitched_lds(
        n_neurons,
        latent_dim,
        eig_moduli=tuple(eig_moduli),
        noise_to_signal=noise_to_signal,
        seed=seed,
    )
    acts, x = simulate_stitched(params, layout, seed=seed)
    ids = np.array([f"n{i}" for i in range(n_neurons)])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for rec, y in zip(layout, acts, strict=True):
        lo, hi = rec.neurons
        path = out / f"{rec.name}.npz"
        _save_npz(path, activity=y.astype(np.float32), neuron_ids=ids[lo:hi], rate_hz=rate_hz)
        paths.append(path)
    _save_npz(
        out / "truth.npz",
        **{k: v for k, v in params._asdict().items() if v is not None},
        x=x,
        neuron_ids=ids,
        rate_hz=rate_hz,
    )
    return paths


def _sim_recording(d: dict[str, Any]) -> SimRecording:
    return SimRecording(
        str(d["name"]), (int(d["neurons"][0]), int(d["neurons"][1])), int(d["n_time"])
    )


def _save_npz(path: Path, **arrays: Any) -> None:
    """Write an npz atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


class PoissonTrialTruth(NamedTuple):
    """Ground truth of a Poisson LDS over trials.

    A, Q, Pi: (latents, latents); C: (neurons, latents); d: (neurons,) log baseline per bin;
    h: (trials, latents) slow modulator; x: (trials, time, latents) latent paths;
    trial_ids: (trials,); counts: (trials, time, neurons); A_trials: (trials, latents,
    latents) each trial's dynamics when they drift, else None.
    """

    A: np.ndarray
    Q: np.ndarray
    Pi: np.ndarray
    C: np.ndarray
    d: np.ndarray
    h: np.ndarray
    x: np.ndarray
    trial_ids: np.ndarray
    counts: np.ndarray
    A_trials: np.ndarray | None = None


def gp_sample(
    trial_numbers: np.ndarray, sigma2: float, tau: float, n_dims: int, rng: np.random.Generator
) -> np.ndarray:
    """(trials, n_dims) independent draws of a GP with squared-exponential kernel
    ``K[r, s] = sigma2 exp(-(n_r - n_s)^2 / (2 tau^2))`` over the trial numbers."""
    n = np.asarray(trial_numbers, dtype=np.float64)
    K = sigma2 * np.exp(-0.5 * ((n[:, None] - n[None, :]) / tau) ** 2)
    w, V = np.linalg.eigh(K)
    L = V * np.sqrt(np.clip(w, 0, None))
    return L @ rng.standard_normal((len(n), n_dims))


def simulate_poisson_trials(
    *,
    n_neurons: int,
    latent_dim: int,
    n_trials: int,
    n_bins: int,
    bin_size_s: float = 0.02,
    base_rate_hz: float = 10.0,
    eig_moduli: tuple[float, float] = (0.8, 0.95),
    latent_std: float = 0.5,
    drift_sigma2: float = 0.25,
    drift_tau: float = 20.0,
    drift_dims: int | None = None,
    opposite_groups: bool = False,
    dynamics_drift_scale: float = 0.0,
    dynamics_drift_tau: float | None = None,
    seed: int = 0,
) -> PoissonTrialTruth:
    """Sample a Poisson LDS with a slow GP drift across trials (see the module docstring).

    ``latent_std`` sets the stationary standard deviation of each ``c_i' x``; ``drift_dims``
    latents (default all) carry the drift ``h``. With ``opposite_groups`` the first latent's
    loadings are positive for the first half of the neurons and negative for the second, so
    the two groups drift in opposite directions (the design of Park et al.'s Figure 2).
    ``dynamics_drift_scale`` a > 0 makes the dynamics drift too: ``A[r] = A (1 + a g[r])``
    with g a unit-variance GP over trials of length-scale ``dynamics_drift_tau`` (default
    ``drift_tau``); every trial starts from its own stationary covariance.
    """
    rng = np.random.default_rng(seed)
    A = random_dynamics(latent_dim, tuple(eig_moduli), rng)
    Q = np.eye(latent_dim)
    Pi = stationary_covariance(A, Q)
    s = np.sqrt(np.trace(Pi) / latent_dim)
    Q, Pi = Q / s**2, Pi / s**2
    C = rng.standard_normal((n_neurons, latent_dim)) * latent_std / np.sqrt(latent_dim)
    if opposite_groups:
        sign = np.where(np.arange(n_neurons) < n_neurons // 2, 1.0, -1.0)
        C[:, 0] = sign * np.abs(C[:, 0]) + sign * latent_std / np.sqrt(latent_dim)
    d = np.full(n_neurons, np.log(base_rate_hz * bin_size_s)) + 0.3 * rng.standard_normal(n_neurons)
    trial_ids = np.arange(n_trials)
    k_drift = latent_dim if drift_dims is None else int(drift_dims)
    h = np.zeros((n_trials, latent_dim))
    if k_drift > 0 and drift_sigma2 > 0:
        h[:, :k_drift] = gp_sample(trial_ids, drift_sigma2, drift_tau, k_drift, rng)
    A_trials = None
    if dynamics_drift_scale > 0:
        tau_g = drift_tau if dynamics_drift_tau is None else dynamics_drift_tau
        g = gp_sample(trial_ids, 1.0, tau_g, 1, rng)[:, 0]
        A_trials = A[None] * (1 + dynamics_drift_scale * g)[:, None, None]
        radius = np.abs(np.linalg.eigvals(A_trials)).max()
        if radius >= 1:
            raise InputError(
                "simulate.dynamics_drift_scale",
                f"{dynamics_drift_scale} makes A unstable (|eig| "
                f"{radius:.3f}); lower it or eig_moduli",
            )
        x = np.stack(
            [
                sample_lds_latents(Ar, Q, stationary_covariance(Ar, Q), n_bins, rng)
                for Ar in A_trials
            ]
        )
    else:
        x = np.stack([sample_lds_latents(A, Q, Pi, n_bins, rng) for _ in range(n_trials)])
    log_rate = (x + h[:, None, :]) @ C.T + d
    counts = rng.poisson(np.exp(log_rate))
    return PoissonTrialTruth(A, Q, Pi, C, d, h, x, trial_ids, counts, A_trials)


def write_poisson_trial_simulation(
    out_dir: str | Path, *, name: str = "trials", bin_size_s: float = 0.02, **kwargs: Any
) -> list[Path]:
    """Simulate with :func:`simulate_poisson_trials` and write ``<name>.npz`` (counts as int32
    (trials, time, neurons), ``trial_ids``, ``rate_hz = 1 / bin_size_s``) and ``truth.npz``
    (all parameters, ``h`` and the log-rate shift ``h C'`` (trials, neurons))."""
    truth = simulate_poisson_trials(bin_size_s=bin_size_s, **kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = np.array([f"n{i}" for i in range(truth.C.shape[0])])
    path = out / f"{name}.npz"
    _save_npz(
        path,
        activity=truth.counts.astype(np.int32),
        neuron_ids=ids,
        rate_hz=1.0 / bin_size_s,
        trial_ids=truth.trial_ids,
    )
    fields = {k: v for k, v in truth._asdict().items() if k != "counts" and v is not None}
    _save_npz(out / "truth.npz", **fields, log_rate_shift=truth.h @ truth.C.T, neuron_ids=ids)
    return [path]


def write_simulation(out_dir: str | Path, settings: dict[str, Any]) -> list[Path]:
    """Write the simulated dataset a config's ``simulate:`` block describes.

    ``settings["model"]`` is ``"stitched_lds"`` (keys of :func:`write_stitched_simulation`)
    or ``"poisson_trials"`` (keys of :func:`simulate_poisson_trials`, plus ``name``).
    """
    kw = dict(settings)
    model = kw.pop("model")
    if model == "stitched_lds":
        return write_stitched_simulation(out_dir, **kw)
    if model == "poisson_trials":
        return write_poisson_trial_simulation(out_dir, **kw)
    raise InputError("simulate.model", f"must be 'stitched_lds' or 'poisson_trials', got {model!r}")
