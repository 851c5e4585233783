"""Fitting the stitched LDS by moment matching (Nonnenmacher, Turaga & Macke 2017).

Model (time-major; ``x[t]``: (n,), ``y[t]``: (N,))::

    x[t+1] = A x[t] + w[t],   w ~ N(0, Q)
    y[t]   = C x[t] + v[t],   v ~ N(0, diag(R))
    Pi     = A Pi A' + Q,     X_s = A^s Pi,   cov(y[t+s], y[t]) = C X_s C' + [s = 0] R

Each recording observes its own neurons over its own time span; the loss (``_loss``) compares
model and empirical lagged covariances of the pairs observed together, and the covariances of
pairs never observed together are predictions.

Fitting, all deterministic for a given seed:

1. Warm start. PCA of the largest recording (subspace iteration on its covariance) gives its
   loadings and ``X_s`` from the lagged covariances of its projections. Each further
   recording, in breadth-first order over the overlap graph, gets the loadings of its new
   neurons ``u`` by least squares against the neurons ``k`` already placed:
   ``C_u sum_s (X_s G_k X_s' + X_s' G_k X_s) = sum_s (F_s X_s' + B_s X_s)`` with
   ``G_k = C_k' C_k``, ``F_s = sum_t y_u[t+s] z_k[t]' / (T-s)`` and
   ``B_s = sum_t y_u[t] z_k[t+s]' / (T-s)``.
2. Free stage: ``C`` and every ``X_s`` (``X_0`` symmetric) by the chosen optimiser
   (:func:`choose_optimizer`: L-BFGS, minibatch SGD (``_sgd``) or subspace moment matching
   (``_subspace``)).
3. ``A = [X_1 ... X_{K-1}] [X_0 ... X_{K-2}]^+`` (the consistent least squares), projected to
   spectral radius < 1 when ``stable``.
4. Linked stage: ``C``, ``A`` and ``Pi = L L'`` (PSD by construction), by the same.
5. ``Q = Pi - A Pi A'`` projected to PSD; ``R_i = max(v_i - C_i Pi C_i', r_floor v_i)``.

Optional random restarts repeat 2-4 from random starts and keep the lowest loss.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
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
from ._data import RecordingInput, StitchedData, prepare_data
from ._loss import DataTerm, loss_and_grad, loss_tensors
from ._sgd import sgd
from ._subspace import Basis, subspace
from .settings import StitchedSettings

log = get_logger()


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
class StitchedFit:
    """The result of :func:`fit`.

    params: the fitted parameters; means: per recording (N_r,) means in the recording's own
    neuron order; trace: list of ``(stage, pass, loss)`` (reduced loss per pair, see
    ``_loss``); info: passes, seconds, convergence per stage, device, warnings.
    """

    params: StitchedLDSParams
    means: dict[str, np.ndarray]
    trace: list[tuple[str, int, float]]
    info: dict[str, Any]
    data: StitchedData = field(repr=False)


def _allowed(data: StitchedData, rec) -> torch.Tensor:
    """(G_r, G_r) float64 on the device: 1 where a pair of the recording's groups is in the
    fit, 0 where it is held out. The warm start sees only the pairs the loss sees, so
    held-out scores stay honest however early a fit stops."""
    g = np.asarray(rec.groups)
    ok = ~data.heldout[np.ix_(g, g)]
    return torch.as_tensor(ok.astype(np.float64), device=data.device)


def _group_products(rec, y: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``y_g V_g`` for every group g of the recording: (rows, G_r, p)."""
    return torch.stack([y[:, sl] @ V[sl] for sl in rec.slices], dim=1)


def _top_subspace(
    data: StitchedData,
    rec_index: int,
    n: int,
    seed: int,
    moments: torch.Tensor | None = None,
    iters: int | None = None,
):
    """Top-n eigenvectors (N_r, n) and eigenvalues of recording ``rec_index``'s covariance,
    with the held-out pairs' entries set to zero, in its column order.

    From the data: a randomized range finder with one power iteration (two passes: the range
    of ``Cov Omega`` for a Gaussian ``Omega`` of n + 8 columns, then Rayleigh-Ritz on it),
    enough when the top n eigenvalues stand out of the noise, which is when a fit is worth
    starting. From the recording's lagged ``moments`` (no data read): 20 subspace iterations
    of the dense matrix. ``iters`` overrides the number of iterations."""
    rec = data.recordings[rec_index]
    dev = data.device
    n_r = len(rec.neurons)
    p = min(n_r, n + 8)
    g = torch.Generator(device="cpu").manual_seed(seed)
    V = torch.randn((n_r, p), generator=g, dtype=torch.float64).to(dev)
    if moments is not None:
        iters, cov = iters or 20, moments[0]

        def apply(V: torch.Tensor) -> torch.Tensor:
            return cov @ V
    else:
        iters = iters or 1
        allowed = _allowed(data, rec).to(rec.dtype)

        def apply(V: torch.Tensor) -> torch.Tensor:
            W = torch.zeros_like(V)
            V32 = V.to(rec.dtype)
            for _, y in rec.chunks(dev):
                Zg = torch.einsum("gh,thp->tgp", allowed, _group_products(rec, y, V32))
                for k, sl in enumerate(rec.slices):
                    W[sl] += (y[:, sl].T @ Zg[:, k]).to(torch.float64)
            return W

    for it in range(iters + 1):
        W = apply(V)
        if it < iters:
            V, _ = torch.linalg.qr(W / rec.n_time)
    small = V.T @ W / rec.n_time  # Rayleigh-Ritz on the last subspace
    evals, evecs = torch.linalg.eigh(sym(small))
    order = torch.argsort(evals, descending=True)[:n]
    return V @ evecs[:, order], evals[order]


def _project_groups(rec, C: torch.Tensor, dev) -> torch.Tensor:
    """``z[t, g] = C_g' y_g[t]`` for every group of a recording: (T_r, G_r, n) float64, with
    ``C`` (N_r, n) in the recording's column order (zero rows for unplaced neurons)."""
    z = torch.empty((rec.n_time, len(rec.slices), C.shape[1]), dtype=torch.float64, device=dev)
    C32 = C.to(rec.dtype)
    for t0, y in rec.chunks(dev):
        z[t0 : t0 + y.shape[0]] = _group_products(rec, y, C32).to(torch.float64)
    return z


def _start_lagged(data: StitchedData, k: int, V: torch.Tensor, moments) -> torch.Tensor:
    """``X_s = sum_(g,h allowed) sum_t z_g[t+s] z_h[t]' / (T-s)`` (K, n, n) of recording k
    with loadings ``V`` (N_r, n): the lagged covariances of its latents, over the pairs the
    loss sees (``= V' S_r(s) V / (T-s)`` from the masked moments)."""
    rec, K = data.recordings[k], data.lags
    T = rec.n_time
    if moments is not None:
        return torch.stack([V.T @ moments[s] @ V / (T - s) for s in range(K)])
    z = _project_groups(rec, V, data.device)  # (T, G, n)
    za = torch.einsum("gh,thn->tgn", _allowed(data, rec), z)
    n = V.shape[1]
    return torch.stack(
        [z[s:].reshape(-1, n).T @ za[: T - s].reshape(-1, n) / (T - s) for s in range(K)]
    )


def warm_start(
    data: StitchedData, n: int, seed: int = 0, ridge: float = 1e-6, term: DataTerm | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Deterministic start ``(C (N, n), X (K, n, n))`` (module docstring, step 1), and warnings
    for recordings that share no neuron with the recordings placed before them. Held-out
    pairs take no part in it. Recordings on the moments route of ``term`` are read from their
    moments, the others from the data (two passes for the PCA, two for each later
    recording)."""

    def moments(k: int):
        return term.masked_moments(k) if term is not None else None

    dev = data.device
    C = torch.zeros((data.n_neurons, n), dtype=torch.float64, device=dev)
    known = np.zeros(data.n_neurons, dtype=bool)
    first = int(np.argmax([len(r.neurons) for r in data.recordings]))
    rec = data.recordings[first]
    if len(rec.neurons) < n:
        raise InputError(
            "stitched_lds.latent_dims",
            f"latent dimension {n} exceeds the {len(rec.neurons)} neurons of the largest "
            f"recording ({rec.name}); choose latent_dims of at most {len(rec.neurons)}",
        )
    mom = moments(first)
    V, _ = _top_subspace(data, first, n, seed, mom)
    C[torch.as_tensor(rec.neurons, device=dev)] = V
    known[rec.neurons] = True
    X = _start_lagged(data, first, V, mom)
    del mom
    warnings: list[str] = []
    todo = [k for k in range(len(data.recordings)) if k != first]
    while todo:
        overlap = [int(known[data.recordings[k].neurons].sum()) for k in todo]
        k = todo.pop(int(np.argmax(overlap)))
        rec = data.recordings[k]
        new = ~known[rec.neurons]
        if not new.any():
            continue
        if not (~new).any():
            warnings.append(
                f"recording {rec.name} shares no neuron with the recordings placed before it: "
                "its loadings start from its own PCA and are tied to the others only through "
                "the shared dynamics"
            )
            Vr, _ = _top_subspace(data, k, n, seed + k, moments(k))
            C[torch.as_tensor(rec.neurons[new], device=dev)] = Vr[torch.as_tensor(new)]
            known[rec.neurons[new]] = True
            continue
        _place_new_neurons(data, rec, C, X, known, ridge, moments(k))
        known[rec.neurons[new]] = True
    return C, X, warnings


def _place_new_neurons(
    data: StitchedData, rec, C, X, known: np.ndarray, ridge: float, moments=None
) -> None:
    """Least-squares loadings (module docstring, step 1) of the recording's neurons not yet
    placed, group by group, against the placed neurons it may pair with (not held out);
    written into ``C`` in place. ``F_s`` and ``B_s`` of every group come from one pass over
    the data (after the one that projects it), or from the recording's masked moments:
    ``F_s = S(s)[u, :] C_k``, ``B_s = S(s)[:, u]' C_k``."""
    dev = data.device
    K, n, T = data.lags, C.shape[1], rec.n_time
    rows = torch.as_tensor(rec.neurons, device=dev)
    placed = torch.as_tensor(known[rec.neurons].astype(np.float64), device=dev)
    Ck = C[rows] * placed[:, None]  # the recording's placed loadings, zero elsewhere
    allowed = _allowed(data, rec)
    counts = torch.as_tensor([T - s for s in range(K)], dtype=torch.float64, device=dev)
    todo = [g for g, sl in enumerate(rec.slices) if not known[rec.neurons[sl]].all()]
    FB: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if moments is not None:
        for g in todo:
            sl = rec.slices[g]
            FB[g] = (moments[:, sl] @ Ck, moments[:, :, sl].transpose(1, 2) @ Ck)
    else:
        zk = _project_groups(rec, Ck, dev)  # (T, G_r, n)
        z = torch.einsum("gh,thn->tgn", allowed, zk)  # placed partners of each group
        for g in todo:
            m = rec.slices[g].stop - rec.slices[g].start
            FB[g] = (
                torch.zeros((K, m, n), dtype=torch.float64, device=dev),
                torch.zeros((K, m, n), dtype=torch.float64, device=dev),
            )
        for t0, y in rec.chunks(dev):
            t1 = t0 + y.shape[0]
            for g in todo:
                F, B = FB[g]
                yu = y[:, rec.slices[g]].to(torch.float64)
                for s in range(K):
                    a = max(t0, s)  # rows t with t - s >= 0
                    if a < t1:
                        F[s] += yu[a - t0 :].T @ z[a - s : t1 - s, g]
                    b = min(t1, T - s)  # rows t with t + s < T
                    if b > t0:
                        B[s] += yu[: b - t0].T @ z[t0 + s : b + s, g]
    for g in todo:
        sl = rec.slices[g]
        F, B = (M / counts[:, None, None] for M in FB[g])
        G = sum(
            Ck[h.start : h.stop].T @ Ck[h.start : h.stop] * allowed[g, j]
            for j, h in enumerate(rec.slices)
        )
        H = sum(X[s] @ G @ X[s].T + X[s].T @ G @ X[s] for s in range(K))
        rhs = sum(F[s] @ X[s].T + B[s] @ X[s] for s in range(K))
        H = H + ridge * torch.trace(H) / n * torch.eye(n, dtype=H.dtype, device=dev)
        C[rows[sl]] = torch.linalg.solve(H, rhs.T).T  # a group is placed whole or not at all


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


#: Stops at a cap rather than by the convergence test.
CAPS = ("max_passes", "max_epochs")

#: The free stage's tolerance, in multiples of ``tol``: its ``X_s`` only start the linked
#: stage, and in directions the data barely determine (spare latent dimensions) it creeps.
FREE_STAGE_TOL = 10.0


class _Stop(Exception):
    """Raised from the closure to end an L-BFGS run (converged or out of passes)."""


#: L-BFGS iterations between two checkpoints' chances (:func:`_lbfgs` with ``progress``).
CHECKPOINT_BLOCK = 20


class _Progress:
    """A checkpointed fit's record: each finished (start, stage) and the stage in progress,
    saved through a :class:`~poplds._checkpoint.Checkpointer`."""

    def __init__(self, saver: Checkpointer) -> None:
        self.saver = saver
        saved = saver.load() or {}
        self.done: dict[str, Any] = saved.get("done", {})
        self.current: dict[str, Any] | None = saved.get("current")
        self.start = ""

    def _key(self, stage: str) -> str:
        return f"{self.start}/{stage}"

    def finished(self, stage: str) -> Any:
        return self.done.get(self._key(stage))

    def finish(self, stage: str, result: Any) -> None:
        self.done[self._key(stage)] = result
        self.current = None
        self.saver.save({"done": self.done, "current": None}, force=True)

    def resume(self, stage: str) -> dict[str, Any] | None:
        c = self.current
        return c["state"] if c is not None and c["key"] == self._key(stage) else None

    def save_stage(self, stage: str, state: dict[str, Any]) -> None:
        self.current = {"key": self._key(stage), "state": state}
        self.saver.save({"done": self.done, "current": self.current})


def _lbfgs(
    params: list[torch.Tensor],
    closure: Callable[[], torch.Tensor],
    *,
    max_passes: int,
    tol: float,
    scale: float,
    trace: list[tuple[str, int, float]],
    stage: str,
    window: int = 10,
    log_every: int = 25,
    progress: _Progress | None = None,
) -> dict[str, Any]:
    """Run L-BFGS (strong Wolfe line search) on ``closure`` and return the best point seen.

    A pass is one evaluation of loss and gradient (two products with the data). With
    ``b_k`` the lowest loss after pass k, the run has converged when, over the last
    ``window`` passes,

        b_{k-window} - b_k <= tol * scale

    with ``scale`` the sampling noise of the loss per pair (:meth:`StitchedData.noise_floor`),
    so the test does not depend on the units, rates or sparsity of the data; it stops at
    ``max_passes`` otherwise. L-BFGS sees the loss in units of ``scale``, so its first step
    is of a sensible size whatever the data's units. Line-search evaluations that do
    not improve count as passes but never end a run by themselves. The parameters are left at
    the best evaluated point (torch's L-BFGS may be in the middle of a line search).

    With ``progress`` (a checkpointed fit), L-BFGS runs in blocks of ``CHECKPOINT_BLOCK``
    iterations and the state (parameters, L-BFGS memory, the passes' record) is handed to
    ``progress`` between blocks; a new block starts by evaluating the point the last one ended
    on, which is not counted, so the path and the passes are those of one uninterrupted run.

    Returns ``passes``, ``stop`` (``converged``, ``max_passes`` or ``no_descent``: L-BFGS found
    no descent direction, a stationary point to machine precision), ``converged`` (True unless
    it stopped at the cap), ``loss_start``, ``loss`` and ``seconds``.
    """
    block = CHECKPOINT_BLOCK if progress is not None else max_passes
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=block,
        max_eval=max_passes + 25,  # the cap is ours (below): L-BFGS must not stop first
        history_size=20,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )
    best: list[float] = []
    state: dict[str, Any] = {"stop": None, "params": None, "repeat": False}
    t = time.perf_counter()
    resumed = progress.resume(stage) if progress is not None else None
    if resumed is not None:
        with torch.no_grad():
            for p, v in zip(params, resumed["params"], strict=True):
                p.copy_(v)
        opt.load_state_dict(resumed["opt"])
        best[:] = resumed["best"]
        trace[:] = resumed["trace"]
        state["params"] = [v.to(params[0].device) for v in resumed["best_params"]]
        state["repeat"] = True

    def wrapped() -> torch.Tensor:
        if state["stop"] is not None:
            raise _Stop
        loss = closure()
        for p in params:  # in units of `scale`, and contiguous: L-BFGS flattens with view()
            if p.grad is not None:
                p.grad = (p.grad / scale).contiguous()
        if state["repeat"]:  # a block's first evaluation repeats the point the last one ended on
            state["repeat"] = False
            return loss / scale
        value = float(loss)
        k = len(best) + 1
        trace.append((stage, k, value))
        if not best or value < best[-1]:
            state["params"] = [p.detach().clone() for p in params]
        best.append(min(value, best[-1]) if best else value)
        if k % log_every == 0:
            log.info(
                "%s: pass %d / at most %d, loss %.6g, %.1f s",
                stage,
                k,
                max_passes,
                best[-1],
                time.perf_counter() - t,
            )
        if k > window and best[-1 - window] - best[-1] <= tol * scale:
            state["stop"] = "converged"
        elif k >= max_passes:
            state["stop"] = "max_passes"
        return loss / scale

    lbfgs_state = opt.state[params[0]]  # torch keeps L-BFGS's counters under the first one
    while True:
        n0 = lbfgs_state.get("n_iter", 0)
        try:
            opt.step(wrapped)
        except _Stop:
            break
        if lbfgs_state["n_iter"] - n0 < block:
            break  # L-BFGS ended by itself (no descent direction)
        state["repeat"] = True
        if progress is not None and progress.saver.due():
            progress.save_stage(
                stage,
                {
                    "params": [p.detach().cpu().clone() for p in params],
                    "opt": opt.state_dict(),
                    "best": list(best),
                    "trace": list(trace),
                    "best_params": [v.cpu() for v in state["params"]],
                },
            )
    if state["params"] is not None:
        with torch.no_grad():
            for p, b in zip(params, state["params"], strict=True):
                p.copy_(b)
    stop = state["stop"] or "no_descent"
    start, end = best[0], best[-1]
    return {
        "passes": len(best),
        "stop": stop,
        "converged": stop != "max_passes",
        "loss_start": start,
        "loss": end,
        "seconds": time.perf_counter() - t,
    }


def _run_stage(params, make_X, term, tens, opts, trace, stage, progress):
    """One stage on ``params`` (``params[0]`` is C; ``make_X()`` builds X from the others)
    by the chosen optimiser: L-BFGS (:func:`_lbfgs`), minibatch SGD (:func:`._sgd.sgd`) or
    subspace moment matching (:func:`._subspace.subspace`)."""
    C = params[0]
    common = dict(stage=stage, tol=opts["tol"], scale=opts["scale"], trace=trace, progress=progress)
    if opts["optimizer"] == "subspace":
        return subspace(
            params,
            make_X,
            term,
            tens,
            max_passes=opts["max_passes"],
            carry=opts["carry"],
            **common,
        )
    if opts["optimizer"] == "sgd":
        return sgd(params, make_X, term, tens, **common, **opts["sgd"])

    def closure() -> torch.Tensor:
        for p in params[1:]:
            p.grad = None
        loss, gC = loss_and_grad(term, C, make_X(), tens)
        C.grad = gC
        return loss

    info = _lbfgs(params, closure, max_passes=opts["max_passes"], **common)
    return {"optimizer": "lbfgs", **info}


def _free_stage(term, tens, C0, X0, unit, opts, trace, stage="free", progress=None):
    """C and every X_s (X_0 symmetric). The optimiser moves ``X_s / unit`` (``unit`` the mean
    variance), so its path does not depend on the units of the data."""
    C = C0.clone().requires_grad_(True)
    Xt = (X0 / unit).clone().requires_grad_(True)

    def make_X() -> torch.Tensor:
        return unit * torch.cat([(sym(Xt[0]))[None], Xt[1:]])

    # the free stage only starts the linked one, which carries the user's tolerance
    opts = {**opts, "tol": FREE_STAGE_TOL * opts["tol"]}
    info = _run_stage([C, Xt], make_X, term, tens, opts, trace, stage, progress)
    Xf = unit * Xt.detach().clone()
    Xf[0] = sym(Xf[0])
    return C.detach(), Xf, info


def linked_lagged(A: torch.Tensor, Pi: torch.Tensor, lags: int) -> torch.Tensor:
    """``X_s = A^s Pi`` for s < K: (K, n, n)."""
    out = [Pi]
    for _ in range(1, lags):
        out.append(A @ out[-1])
    return torch.stack(out)


def _linked_stage(term, tens, C0, A0, Pi0, unit, opts, trace, stage="linked", progress=None):
    """C, A and ``Pi = L L'`` (L lower triangular); the optimiser moves ``L / sqrt(unit)``,
    as :func:`_free_stage` does ``X_s / unit``."""
    dev = C0.device
    C = C0.clone().requires_grad_(True)
    A = torch.as_tensor(A0, device=dev).clone().requires_grad_(True)
    L0 = torch.linalg.cholesky(torch.as_tensor(Pi0, device=dev) / unit)
    L = L0.clone().requires_grad_(True)

    def make_X() -> torch.Tensor:
        Ltri = torch.tril(L)
        return linked_lagged(A, unit * (Ltri @ Ltri.T), term.data.lags)

    info = _run_stage([C, A, L], make_X, term, tens, opts, trace, stage, progress)
    Lf = torch.tril(L.detach())
    return C.detach(), A.detach(), unit * (Lf @ Lf.T), info


#: ``optimizer: auto`` considers SGD when an epoch has at least this many minibatch windows.
SGD_MIN_WINDOWS = 128

#: Reads of the data a fit is expected to take by each optimiser, for ``optimizer: auto``.
#: Measured (``benchmarks/bench_stitched.py``): L-BFGS 61-373 passes over two stages, SGD 73
#: (55 windows per epoch) to 100 (390 windows), the subspace optimiser 8-16; the subspace
#: figure is taken at twice the most measured.
EXPECTED_READS = {"lbfgs": 300, "sgd": 100, "subspace": 30}

#: Flops one byte read from a store costs, in time, against a large matrix product: on the
#: 2 cores measured, zarr decodes 0.3-0.7 GB/s where float32 products run at about 25 GFlop/s.
READ_FLOPS_PER_BYTE = 40.0


def optimizer_costs(term: DataTerm) -> dict[str, float]:
    """Modelled flops of a fit by each optimiser: its expected reads of the data
    (``EXPECTED_READS``) times the products of a pass, plus what the subspace optimiser adds
    per pass without reading the data (forming the lagged moments of the projections,
    ``2 T_r d_r^2 K`` with ``d_r = (MEMORY + 2) G_r n``, and its inner solve, about
    ``INNER_ITERATIONS`` evaluations of ``6 N n (n + MEMORY + 1)``). A pass over a streamed
    recording also costs ``READ_FLOPS_PER_BYTE`` per byte read. Recordings on the moments
    route read nothing and count for none of them."""
    from ._subspace import INNER_ITERATIONS, MEMORY

    data, n, K = term.data, term.n_latent, term.data.lags
    per_pass = extra = 0.0
    for rec, how in zip(data.recordings, term.routes, strict=True):
        if how == "data":
            T, N, G = rec.n_time, len(rec.neurons), len(rec.slices)
            per_pass += 4.0 * T * N * n
            if rec.data is None:
                per_pass += READ_FLOPS_PER_BYTE * T * N * 4  # float32 in the store
            extra += 2.0 * T * ((MEMORY + 2) * G * n) ** 2 * K
    if per_pass:
        extra += INNER_ITERATIONS * 6.0 * int(np.sum(data.group_of >= 0)) * n * (n + MEMORY + 1)
    out = {k: EXPECTED_READS[k] * per_pass for k in ("lbfgs", "sgd")}
    out["subspace"] = EXPECTED_READS["subspace"] * (per_pass + extra)
    return out


def choose_optimizer(term: DataTerm, optimizer: str) -> str:
    """``lbfgs``, ``sgd`` or ``subspace``; ``auto`` takes the one of least modelled cost
    (:func:`optimizer_costs`), SGD only when an epoch has at least ``SGD_MIN_WINDOWS``
    windows on the data route (with fewer, its reads were not fewer than L-BFGS's), and
    L-BFGS when no recording is on the data route (a pass then reads nothing)."""
    if optimizer not in ("auto", "lbfgs", "sgd", "subspace"):
        raise InputError(
            "stitched_lds.optimizer", f"must be auto, lbfgs, sgd or subspace, got {optimizer!r}"
        )
    if optimizer != "auto":
        return optimizer
    costs = optimizer_costs(term)
    if not costs["lbfgs"]:
        return "lbfgs"
    if len(term.windows()) < SGD_MIN_WINDOWS:
        del costs["sgd"]
    return min(costs, key=lambda k: (costs[k], k != "lbfgs"))


def fit(
    recordings: Sequence[RecordingInput],
    n_neurons: int,
    latent_dim: int,
    *,
    lags: int = StitchedSettings.lags,
    device: str | torch.device = StitchedSettings.device,
    heldout_fraction: float = StitchedSettings.heldout_fraction,
    seed: int = StitchedSettings.seed,
    restarts: int = StitchedSettings.restarts,
    max_passes: int = StitchedSettings.max_passes,
    tol: float = StitchedSettings.tol,
    stable: bool = True,
    r_floor: float = 1e-3,
    max_device_bytes: float | None = StitchedSettings.max_device_bytes,
    data: StitchedData | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every_s: float = 60.0,
    route: str = StitchedSettings.route,
    optimizer: str = StitchedSettings.optimizer,
    minibatch_rows: int = StitchedSettings.minibatch_rows,
    max_epochs: int = StitchedSettings.max_epochs,
    learning_rate: float = StitchedSettings.learning_rate,
) -> StitchedFit:
    """Fit one stitched LDS to partial recordings (module docstring).

    Parameters
    ----------
    recordings: each (time, neurons) activity with its neurons' positions in the table.
    n_neurons: N_total.
    latent_dim: n.
    lags: K, lags 0..K-1 matched (at least 2).
    device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
    heldout_fraction: fraction of co-observed pairs kept out of the fit for evaluation.
    seed: seeds the warm start's subspace iteration, the held-out split and the restarts.
    restarts: extra random starts; the lowest final loss wins.
    max_passes: per stage; a pass is one loss and gradient evaluation.
    tol: a stage has converged when its loss falls by less than ``tol`` times the sampling
        noise of the loss per pair over 10 passes (see :func:`_lbfgs`).
    stable: keep the spectral radius of A below 1.
    r_floor: ``R_i >= r_floor * v_i`` (the smoother needs R > 0).
    max_device_bytes: hold the data on the device up to this size, else stream it.
    data: already prepared data (skips preparation; ``recordings`` then only names them).
    checkpoint: a file where the fit saves its progress (every ``checkpoint_every_s`` seconds,
        between blocks of L-BFGS iterations, and after each stage); a fit started again with
        the same data, settings and file continues from it and reaches the same fit as one
        never interrupted.
    route: how each recording's data term is computed, ``data``, ``moments`` or ``auto``
        (the cheaper one, see :mod:`._loss`); the same loss either way.
    optimizer: ``lbfgs``, ``sgd`` (minibatch Adam over time windows, :mod:`._sgd`) or
        ``auto`` (:func:`choose_optimizer`); minibatch_rows: time steps per minibatch;
        max_epochs: SGD's cap per stage; learning_rate: Adam's step relative to each
        parameter's size.
    """
    t_start = time.perf_counter()
    dev = local_device(choose_device(device) if isinstance(device, str) else torch.device(device))
    if latent_dim < 1:
        raise InputError("stitched_lds.latent_dims", f"must be >= 1, got {latent_dim}")
    if data is None:
        data = prepare_data(
            recordings,
            n_neurons,
            lags=lags,
            device=dev,
            heldout_fraction=heldout_fraction,
            seed=seed,
            max_device_bytes=max_device_bytes,
        )
    tens = loss_tensors(data, dev)
    term = DataTerm(data, data.weights(dev), latent_dim, route=route, window_rows=minibatch_rows)
    v = data.variance[data.group_of >= 0]
    chosen = choose_optimizer(term, optimizer)
    opts = {
        "max_passes": max_passes,
        "tol": tol,
        "scale": data.noise_floor(),
        "optimizer": chosen,
        "sgd": {"seed": seed, "learning_rate": learning_rate, "max_epochs": max_epochs},
    }
    unit = float(np.mean(v))  # the optimisers move X_s / unit: their paths are unit-free
    warnings = connectivity_warnings(data, latent_dim) + left_out_warnings(data)
    for w in warnings:
        log.warning(w)

    starts = []
    C0, X0, w0 = warm_start(data, latent_dim, seed, term=term)
    broadcast(C0, X0)  # every rank computed the same start; this makes it exact
    for w in w0:
        log.warning(w)
    warnings += w0
    starts.append(("warm", C0, X0))
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    for k in range(restarts):  # loadings of unit scale, latents of the data's mean variance
        Cr = torch.randn(C0.shape, generator=gen, dtype=torch.float64) / math.sqrt(latent_dim)
        Xr = torch.stack([torch.eye(latent_dim, dtype=torch.float64) * 0.9**s for s in range(lags)])
        starts.append((f"restart{k + 1}", Cr.to(dev), unit * Xr.to(dev)))

    progress = None
    if checkpoint is not None:
        key = fingerprint(
            data.group_of,
            data.pair_count,
            data.variance,
            *[rec.mean for rec in data.recordings],
            latent_dim=latent_dim,
            lags=lags,
            seed=seed,
            restarts=restarts,
            max_passes=max_passes,
            tol=tol,
            stable=stable,
            heldout_fraction=heldout_fraction,
            routes=term.routes,
            optimizer=chosen,
            sgd=opts["sgd"] if chosen == "sgd" else None,
            minibatch_rows=minibatch_rows if chosen == "sgd" else None,
        )
        progress = _Progress(Checkpointer(checkpoint, key, checkpoint_every_s))
    best = None
    for name, Cs, Xs in starts:
        trace: list[tuple[str, int, float]] = []
        opts["carry"] = {}  # what one stage hands the next (the subspace optimiser's basis)
        if progress is not None:
            progress.start = name
        done = progress.finished("linked") if progress is not None else None
        if done is not None:  # this start ended before the interruption
            trace[:] = done["trace"]
            info1, info2 = done["info1"], done["info2"]
            C2, A2, Pi2 = (v.to(dev) for v in done["out"])
        else:
            free = progress.finished("free") if progress is not None else None
            if free is not None:
                C1, X1 = (v.to(dev) for v in free["out"])
                info1, trace[:] = free["info"], free["trace"]
                if free.get("basis") is not None:  # the subspace optimiser's, for the next stage
                    opts["carry"]["basis"] = Basis(term, tens)
                    opts["carry"]["basis"].load(free["basis"])
            else:
                C1, X1, info1 = _free_stage(
                    term, tens, Cs, Xs, unit, opts, trace, progress=progress
                )
                if progress is not None:
                    basis = opts["carry"].get("basis")
                    progress.finish(
                        "free",
                        {
                            "out": (C1.cpu(), X1.cpu()),
                            "info": info1,
                            "trace": list(trace),
                            "basis": None if basis is None else basis.state(),
                        },
                    )
            A1 = dynamics_from_lagged(X1.cpu().numpy(), stable=stable)
            floor1 = 1e-6 * float(torch.trace(X1[0])) / latent_dim
            Pi1 = psd_project(X1[0].cpu().numpy(), floor=floor1)
            C2, A2, Pi2, info2 = _linked_stage(
                term, tens, C1, A1, Pi1, unit, opts, trace, progress=progress
            )
            if progress is not None:
                progress.finish(
                    "linked",
                    {
                        "out": (C2.cpu(), A2.cpu(), Pi2.cpu()),
                        "info1": info1,
                        "info2": info2,
                        "trace": list(trace),
                    },
                )
        for stage, info in (("free", info1), ("linked", info2)):
            log.info(
                "%s: %s stage (%s) %s after %d passes, %.1f s: loss %.6g -> %.6g",
                name,
                stage,
                info["optimizer"],
                "stopped at the cap" if info["stop"] in CAPS else info["stop"],
                info["passes"],
                info["seconds"],
                info["loss_start"],
                info["loss"],
            )
        if best is None or info2["loss"] < best[0]:
            best = (info2["loss"], name, C2, A2, Pi2, trace, info1, info2)
    _, name, C, A, Pi, trace, info1, info2 = best
    floor = opts["scale"]
    moved = (info1["loss_start"] - info2["loss"]) / floor
    caps = {"max_passes": max_passes, "max_epochs": max_epochs}
    fit_warnings = [
        f"the {stage} stage stopped at stitched_lds.{info['stop']} ({caps[info['stop']]}) "
        f"before its convergence test held; raise {info['stop']} (or tol) for a converged fit"
        for stage, info in (("free", info1), ("linked", info2))
        if info["stop"] in CAPS
    ]
    if moved < 10 * tol:
        fit_warnings.append(
            f"the fit barely moved from its warm start (the loss fell by {moved:.2g} times its "
            "sampling noise per pair): the result is essentially the deterministic start"
        )
    for w in fit_warnings:
        log.warning(w)
    warnings += fit_warnings
    guards: Counter = Counter()  # how often each numerical guard changed the result
    A_np = A.cpu().numpy()
    if stable:
        A_np = stabilise(A_np, guards=guards)
    Pi_np = sym(Pi.cpu().numpy())
    Q = psd_project(Pi_np - A_np @ Pi_np @ A_np.T, guards=guards)
    C_np = C.cpu().numpy()
    signal = np.einsum("ia,ab,ib->i", C_np, Pi_np, C_np)
    var = np.nan_to_num(data.variance, nan=0.0)
    R = np.maximum(var - signal, r_floor * var)
    guards["noise_floor"] = int(np.sum((var - signal < r_floor * var) & (data.group_of >= 0)))
    unfit = data.group_of < 0  # never observed with any variance: nothing to fit
    C_np[unfit], R[unfit] = np.nan, np.nan
    means = {rec.name: rec.mean_in_source_order() for rec in data.recordings}
    info = {
        "device": str(dev),
        "optimizer": chosen,
        "start": name,
        "free": info1,
        "linked": info2,
        "stop": next((i["stop"] for i in (info1, info2) if i["stop"] in CAPS), "converged"),
        "noise_floor": floor,
        "moved_noise_units": moved,
        "seconds": time.perf_counter() - t_start,
        "warnings": warnings,
        "n_groups": data.n_groups,
        "n_pairs": data.n_pairs(),
        "routes": dict(zip([r.name for r in data.recordings], term.routes, strict=True)),
        "guards": {k: guards[k] for k in ("stable_cap", "psd_floor", "noise_floor")},
    }
    return StitchedFit(
        params=StitchedLDSParams.from_dynamics(A_np, C_np, Q, R, Pi_np, lags),
        means=means,
        trace=trace,
        info=info,
        data=data,
    )


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
