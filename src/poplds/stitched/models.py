"""Fitting the stitched LDS by moment matching (Nonnenmacher, Turaga & Macke 2017).

Model (time-major; ``x[t]``: (n,), ``y[t]``: (N,))::

    x[t+1] = A x[t] + w[t],   w ~ N(0, Q)
    y[t]   = C x[t] + v[t],   v ~ N(0, diag(R))
    Pi     = A Pi A' + Q,     X_s = A^s Pi,   cov(y[t+s], y[t]) = C X_s C' + [s = 0] R

Each recording observes its own neurons over its own time span; the loss (``_loss``) compares
model and empirical lagged covariances of the pairs observed together, and the covariances of
pairs never observed together are predictions.

Fitting, all deterministic for a given seed:

1. Warm start (``_warm``): PCA of the largest recording, then each further recording's new
   neurons by least squares against the neurons already placed.
2. Free stage: ``C`` and every ``X_s`` (``X_0`` symmetric) by the chosen optimiser, run by
   ``_stage.run_stage`` (``auto``: :func:`._stage.choose_optimizer` among the registered
   ones, L-BFGS (``_lbfgs``), minibatch SGD (``_sgd``) or subspace moment matching
   (``_subspace``)).
3. ``A = [X_1 ... X_{K-1}] [X_0 ... X_{K-2}]^+`` (the consistent least squares), projected to
   spectral radius < 1 when ``stable``.
4. Linked stage: ``C``, ``A`` and ``Pi = L L'`` (PSD by construction), by the same.
5. ``Q = Pi - A Pi A'`` projected to PSD; ``R_i = max(v_i - C_i Pi C_i', r_floor v_i)``.

Optional random restarts repeat 2-4 from random starts and keep the lowest loss.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .._checkpoint import Checkpointer, fingerprint
from .._device import choose_device
from .._distributed import broadcast, local_device
from .._errors import InputError
from .._linalg import psd_project, stabilise, sym
from .._logging import get_logger
from ..store import coverage
from ._data import StitchedData
from ._loss import DataTerm, LossTensors
from ._optimizers import choose_optimizer
from ._prepare import RecordingInput, prepare_data
from ._stage import OptimizerSpec, Progress, StageProblem, StageRecord, run_stage
from ._warm import warm_start
from .settings import StitchedSettings

log = get_logger()

#: The free stage's tolerance, in multiples of ``tol``: its ``X_s`` only start the linked
#: stage, and in directions the data barely determine (spare latent dimensions) it creeps.
FREE_STAGE_TOL = 10.0

#: ``R_i >= R_FLOOR * v_i`` (the smoother needs R > 0).
R_FLOOR = 1e-3


class StitchedLDSParams(NamedTuple):
    """Parameters of the stitched LDS, fitted or simulated (numpy float64).

    A: (n, n) dynamics; C: (N_total, n) loadings in the dataset's neuron order; Q: (n, n)
    innovation covariance; R: (N_total,) observation noise variances; Pi: (n, n) stationary
    latent covariance, ``Pi = A Pi A' + Q``; X: (K, n, n) ``A^s Pi`` for s < K (a fit's
    matched lags; None for a simulation's truth, which has every lag).
    """

    A: np.ndarray
    C: np.ndarray
    Q: np.ndarray
    R: np.ndarray
    Pi: np.ndarray
    X: np.ndarray | None = None

    @classmethod
    def from_dynamics(cls, A, C, Q, R, Pi, lags: int) -> StitchedLDSParams:
        """Parameters with ``X_s = A^s Pi`` for s < ``lags`` filled in."""
        X = [Pi]
        for _ in range(1, lags):
            X.append(A @ X[-1])
        return cls(A=A, C=C, Q=Q, R=R, Pi=Pi, X=np.stack(X))

    def lagged_covariance(self, i: np.ndarray, j: np.ndarray, lag: int) -> np.ndarray:
        """Predicted ``cov(y_i[t+lag], y_j[t])`` (len(i), len(j)), ``+ R`` on the diagonal at 0."""
        if self.X is not None and lag < len(self.X):
            Xs = self.X[lag]
        else:
            Xs = np.linalg.matrix_power(self.A, lag) @ self.Pi
        out = self.C[i] @ Xs @ self.C[j].T
        if lag == 0:
            same = np.asarray(i)[:, None] == np.asarray(j)[None, :]
            out = out + np.where(same, self.R[np.asarray(i)][:, None], 0.0)
        return out


@dataclass
@dataclass
class FitInfo:
    """How a fit went.

    device; optimizer (the one that ran); start (the start that won: ``warm`` or
    ``restart<k>``); free, linked: each stage's :class:`._stage.StageRecord`; stop:
    ``converged``, or the cap a stage stopped at; noise_floor: the loss's sampling noise per
    pair; moved_noise_units: how far the loss fell from the warm start, in that unit;
    seconds; warnings; n_groups, n_pairs: the data's observation groups and pairs; routes:
    each recording's data-term route (``data`` or ``moments``); guards: how often each
    numerical guard changed the result.
    """

    device: str
    optimizer: str
    start: str
    free: StageRecord
    linked: StageRecord
    stop: str
    noise_floor: float
    moved_noise_units: float
    seconds: float
    warnings: list[str]
    n_groups: int
    n_pairs: float
    routes: dict[str, str]
    guards: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        """Plain containers, as metrics.json holds them."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["free"], out["linked"] = self.free.as_dict(), self.linked.as_dict()
        return out


@dataclass
class StitchedFit:
    """The result of :func:`fit`.

    params: the fitted parameters; means: per recording (N_r,) means in the recording's own
    neuron order; trace: list of ``(stage, pass, loss)`` (reduced loss per pair, see
    ``_loss``); info: :class:`FitInfo`.
    """

    params: StitchedLDSParams
    means: dict[str, np.ndarray]
    trace: list[tuple[str, int, float]]
    info: FitInfo
    data: StitchedData = field(repr=False)


def dynamics_from_lagged(X: np.ndarray, stable: bool = True, max_radius: float = 0.995):
    """``A = [X_1 ... X_{K-1}] [X_0 ... X_{K-2}]^+`` (n, n): the least squares solution of
    ``X_s = A X_{s-1}``; with ``stable``, eigenvalues of modulus above ``max_radius`` are
    scaled back to it (a real matrix stays real: conjugate pairs are scaled alike)."""
    K = X.shape[0]
    if K < 2:
        raise InputError("stitched_lds.lags", "at least 2 lags are needed to identify A")
    H1 = np.concatenate(list(X[1:]), axis=1)
    H0 = np.concatenate(list(X[:-1]), axis=1)
    A = H1 @ np.linalg.pinv(H0)
    if stable:
        A = stabilise(A, max_radius)
    return A


def linked_lagged(A: torch.Tensor, Pi: torch.Tensor, lags: int) -> torch.Tensor:
    """``X_s = A^s Pi`` for s < K: (K, n, n)."""
    out = [Pi]
    for _ in range(1, lags):
        out.append(A @ out[-1])
    return torch.stack(out)


@dataclass
class _Fitting:
    """What every start and stage of one fit shares: the settings, the data, its loss term
    and bookkeeping tensors, the optimiser and its options, ``unit`` (the mean variance: the
    stages move ``X_s / unit`` and ``L / sqrt(unit)``, so their paths do not depend on the
    data's units), ``scale`` (the loss's sampling noise per pair) and the checkpoint's
    record (None when not checkpointed)."""

    settings: StitchedSettings
    data: StitchedData
    term: DataTerm
    tensors: LossTensors
    spec: OptimizerSpec
    options: Any
    unit: float
    scale: float
    progress: Progress | None

    def problem(self, stage: str, params: list[torch.Tensor], make_X, tol: float) -> StageProblem:
        return StageProblem(
            stage=stage,
            params=params,
            make_X=make_X,
            term=self.term,
            tensors=self.tensors,
            tol=tol,
            scale=self.scale,
            seed=self.settings.seed,
            checkpointed=self.progress is not None,
        )

    def free_stage(self, C0, X0, trace, carry) -> tuple[torch.Tensor, torch.Tensor, StageRecord]:
        """C and every X_s (X_0 symmetric), at ``FREE_STAGE_TOL`` times the tolerance (the
        free stage only starts the linked one, which carries the user's). Returns C (N, n),
        X (K, n, n) and the stage's record."""
        unit = self.unit
        C = C0.clone().requires_grad_(True)
        Xt = (X0 / unit).clone().requires_grad_(True)

        def make_X() -> torch.Tensor:
            return unit * torch.cat([(sym(Xt[0]))[None], Xt[1:]])

        problem = self.problem("free", [C, Xt], make_X, FREE_STAGE_TOL * self.settings.tol)
        record = run_stage(self.spec, self.options, problem, trace, carry, self.progress)
        Xf = unit * Xt.detach().clone()
        Xf[0] = sym(Xf[0])
        return C.detach(), Xf, record

    def linked_stage(self, C0, A0, Pi0, trace, carry):
        """C, A and ``Pi = L L'`` (L lower triangular, PSD by construction). Returns C, A,
        Pi and the stage's record."""
        unit, dev = self.unit, C0.device
        C = C0.clone().requires_grad_(True)
        A = torch.as_tensor(A0, device=dev).clone().requires_grad_(True)
        L0 = torch.linalg.cholesky(torch.as_tensor(Pi0, device=dev) / unit)
        L = L0.clone().requires_grad_(True)

        def make_X() -> torch.Tensor:
            Ltri = torch.tril(L)
            return linked_lagged(A, unit * (Ltri @ Ltri.T), self.data.lags)

        problem = self.problem("linked", [C, A, L], make_X, self.settings.tol)
        record = run_stage(self.spec, self.options, problem, trace, carry, self.progress)
        Lf = torch.tril(L.detach())
        return C.detach(), A.detach(), unit * (Lf @ Lf.T), record

    def from_start(self, name: str, C0: torch.Tensor, X0: torch.Tensor):
        """Both stages from one start (module docstring, steps 2-4), resumed where a
        checkpoint says: ``(C, A, Pi, trace, free record, linked record)``."""
        trace: list[tuple[str, int, float]] = []
        carry: dict = {}  # what the free stage hands the linked one (the subspace basis)
        if self.progress is not None:
            self.progress.start = name
        C1, X1, r1 = self.free_stage(C0, X0, trace, carry)
        A1 = dynamics_from_lagged(X1.cpu().numpy(), stable=True)
        Pi1 = psd_project(X1[0].cpu().numpy(), floor=1e-6 * float(torch.trace(X1[0])) / len(A1))
        C2, A2, Pi2, r2 = self.linked_stage(C1, A1, Pi1, trace, carry)
        for stage, r in (("free", r1), ("linked", r2)):
            log.info(
                "%s: %s stage (%s) %s after %d passes, %.1f s: loss %.6g -> %.6g",
                name,
                stage,
                r.optimizer,
                r.stop if r.converged else "stopped at the cap",
                r.passes,
                r.seconds,
                r.loss_start,
                r.loss,
            )
        return C2, A2, Pi2, trace, r1, r2


def _starts(data: StitchedData, n: int, s: StitchedSettings, term: DataTerm, unit: float):
    """``(name, C (N, n), X (K, n, n))`` of the warm start and of ``s.restarts`` random ones
    (loadings of unit scale, latents of the data's mean variance), and the warm start's
    warnings."""
    C0, X0, warnings = warm_start(data, n, s.seed, term=term)
    broadcast(C0, X0)  # every rank computed the same start; this makes it exact
    starts = [("warm", C0, X0)]
    gen = torch.Generator(device="cpu").manual_seed(s.seed + 1)
    for k in range(s.restarts):
        Cr = torch.randn(C0.shape, generator=gen, dtype=torch.float64) / math.sqrt(n)
        Xr = torch.stack([torch.eye(n, dtype=torch.float64) * 0.9**lag for lag in range(s.lags)])
        starts.append((f"restart{k + 1}", Cr.to(C0.device), unit * Xr.to(C0.device)))
    return starts, warnings


def _progress(path, every_s, data, n, s, term, spec, options) -> Progress | None:
    """The checkpoint's record of a fit, keyed by its data and every setting that changes
    its path."""
    if path is None:
        return None
    key = fingerprint(
        data.group_of,
        data.pair_count,
        data.variance,
        *[rec.mean for rec in data.recordings],
        latent_dim=n,
        lags=s.lags,
        seed=s.seed,
        restarts=s.restarts,
        tol=s.tol,
        heldout_fraction=s.heldout_fraction,
        routes=term.routes,
        optimizer=spec.name,
        options=dataclasses.asdict(options),
    )
    return Progress(Checkpointer(path, key, every_s))


def fit(
    recordings: Sequence[RecordingInput],
    n_neurons: int,
    latent_dim: int,
    settings: StitchedSettings | None = None,
    *,
    data: StitchedData | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every_s: float = 60.0,
) -> StitchedFit:
    """Fit one stitched LDS to partial recordings (module docstring).

    Parameters
    ----------
    recordings: each (time, neurons) activity with its neurons' positions in the table.
    n_neurons: N_total.
    latent_dim: n.
    settings: :class:`~.settings.StitchedSettings` (lags, held-out fraction, seed, restarts,
        optimiser and its options, device, routes...; default: the defaults).
    data: already prepared data (skips preparation; ``recordings`` then only names them).
    checkpoint: a file where the fit saves its progress (every ``checkpoint_every_s`` seconds,
        between the optimiser's steps, and after each stage); a fit started again with the
        same data, settings and file continues from it and reaches the same fit as one never
        interrupted.
    """
    t_start = time.perf_counter()
    s = settings or StitchedSettings()
    dev = local_device(choose_device(s.device))
    if latent_dim < 1:
        raise InputError("stitched_lds.latent_dims", f"must be >= 1, got {latent_dim}")
    if data is None:
        data = prepare_data(
            recordings,
            n_neurons,
            lags=s.lags,
            device=dev,
            heldout_fraction=s.heldout_fraction,
            seed=s.seed,
            max_device_bytes=s.max_device_bytes,
        )
    term = DataTerm(
        data, data.weights(dev), latent_dim, route=s.route, window_rows=s.minibatch_rows
    )
    spec = choose_optimizer(term, s.optimizer)
    options = spec.options_from(s)
    unit = float(np.mean(data.variance[data.group_of >= 0]))
    warnings = connectivity_warnings(data, latent_dim) + left_out_warnings(data)
    for w in warnings:
        log.warning(w)
    starts, w0 = _starts(data, latent_dim, s, term, unit)
    for w in w0:
        log.warning(w)
    warnings += w0
    progress = _progress(checkpoint, checkpoint_every_s, data, latent_dim, s, term, spec, options)
    fitting = _Fitting(
        s, data, term, LossTensors.of(data, dev), spec, options, unit, data.noise_floor(), progress
    )
    best = None
    for name, Cs, Xs in starts:
        C, A, Pi, trace, r1, r2 = fitting.from_start(name, Cs, Xs)
        if best is None or r2.loss < best[0]:
            best = (r2.loss, name, C, A, Pi, trace, r1, r2)
    _, name, C, A, Pi, trace, r1, r2 = best
    params, guards = _noise_and_guards(data, C, A, Pi, s.lags)
    info = FitInfo(
        device=str(dev),
        optimizer=spec.name,
        start=name,
        free=r1,
        linked=r2,
        stop=next((r.stop for r in (r1, r2) if not r.converged), "converged"),
        noise_floor=fitting.scale,
        moved_noise_units=(r1.loss_start - r2.loss) / fitting.scale,
        seconds=time.perf_counter() - t_start,
        warnings=warnings + _fit_warnings(r1, r2, fitting),
        n_groups=data.n_groups,
        n_pairs=data.n_pairs(),
        routes=dict(zip([r.name for r in data.recordings], term.routes, strict=True)),
        guards=guards,
    )
    means = {rec.name: rec.mean_in_source_order() for rec in data.recordings}
    return StitchedFit(params=params, means=means, trace=trace, info=info, data=data)


def _fit_warnings(r1: StageRecord, r2: StageRecord, fitting: _Fitting) -> list[str]:
    """Warnings (also logged) for a stage stopped at its cap and a fit that barely moved."""
    out = [
        f"the {stage} stage stopped at stitched_lds.{r.stop} "
        f"({getattr(fitting.settings, r.stop)}) before its convergence test held; raise "
        f"{r.stop} (or tol) for a converged fit"
        for stage, r in (("free", r1), ("linked", r2))
        if not r.converged
    ]
    moved = (r1.loss_start - r2.loss) / fitting.scale
    if moved < 10 * fitting.settings.tol:
        out.append(
            f"the fit barely moved from its warm start (the loss fell by {moved:.2g} times its "
            "sampling noise per pair): the result is essentially the deterministic start"
        )
    for w in out:
        log.warning(w)
    return out


def _noise_and_guards(data: StitchedData, C, A, Pi, lags: int):
    """The fitted parameters (module docstring, step 5: A kept stable, ``Q = Pi - A Pi A'``
    projected to PSD, ``R_i = max(v_i - C_i Pi C_i', R_FLOOR v_i)``; NaN rows for neurons no
    recording fits) and how often each numerical guard changed them."""
    guards: Counter = Counter()
    A_np = stabilise(A.cpu().numpy(), guards=guards)
    Pi_np = sym(Pi.cpu().numpy())
    Q = psd_project(Pi_np - A_np @ Pi_np @ A_np.T, guards=guards)
    C_np = C.cpu().numpy()
    signal = np.einsum("ia,ab,ib->i", C_np, Pi_np, C_np)
    var = np.nan_to_num(data.variance, nan=0.0)
    R = np.maximum(var - signal, R_FLOOR * var)
    guards["noise_floor"] = int(np.sum((var - signal < R_FLOOR * var) & (data.group_of >= 0)))
    unfit = data.group_of < 0  # never observed with any variance: nothing to fit
    C_np[unfit], R[unfit] = np.nan, np.nan
    params = StitchedLDSParams.from_dynamics(A_np, C_np, Q, R, Pi_np, lags)
    return params, {k: guards[k] for k in ("stable_cap", "psd_floor", "noise_floor")}


def left_out_warnings(data: StitchedData) -> list[str]:
    """One warning per recording that left neurons out of the fit (dataset positions), and
    one for the neurons no recording kept (their C and R are NaN)."""
    out = []
    for name, left in data.left_out.items():
        for reason, words in (("never_observed", "never observed"), ("constant", "constant")):
            if left[reason]:
                out.append(
                    f"recording {name}: {len(left[reason])} neurons {words} in it are left out "
                    f"of the fit (dataset positions {left[reason][:20]})"
                )
    unfit = np.flatnonzero(data.group_of < 0)
    if len(unfit):
        out.append(
            f"{len(unfit)} neurons are fitted by no recording (constant or never observed "
            f"everywhere); their loadings and noise variances are NaN: positions "
            f"{unfit[:20].tolist()}"
        )
    return out


def overlap_graph(data: StitchedData) -> tuple[np.ndarray, list[int]]:
    """Shared-neuron counts (R, R) between the recordings (:func:`poplds.store.coverage`) and
    the connected component of each recording in the graph of recordings sharing a neuron."""
    shared, _ = coverage([r.neurons for r in data.recordings], data.n_neurons)
    adj = shared > 0
    comp = [-1] * len(adj)
    c = 0
    for start in range(len(adj)):
        if comp[start] >= 0:
            continue
        stack = [start]
        comp[start] = c
        while stack:
            a = stack.pop()
            for b in np.flatnonzero(adj[a]):
                if comp[b] < 0:
                    comp[b] = c
                    stack.append(int(b))
        c += 1
    return shared, comp


def connectivity_warnings(data: StitchedData, n: int) -> list[str]:
    """Warnings for a disconnected overlap graph and for overlaps smaller than n."""
    names = [r.name for r in data.recordings]
    shared, comp = overlap_graph(data)
    out = []
    if len(set(comp)) > 1:
        groups: dict[int, list[str]] = {}
        for name, c in zip(names, comp, strict=True):
            groups.setdefault(c, []).append(name)
        out.append(
            "the recordings' overlap graph is disconnected: "
            + " | ".join(", ".join(g) for g in groups.values())
            + "; covariances across components rest on the shared dynamics alone, and the "
            "latent axes of each component are determined only up to symmetries of A and Pi"
        )
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            if 0 < shared[a, b] < n:
                out.append(
                    f"recordings {names[a]} and {names[b]} share {shared[a, b]} neurons, fewer "
                    f"than the latent dimension {n}"
                )
    return out
