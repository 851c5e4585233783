"""How well a stitched LDS predicts lagged covariances, and what the data leave undetermined.

Pairs of neurons (i, j) at lag s fall into three classes:

- ``observed``: recorded together and used in the fit;
- ``heldout``: recorded together but kept out of the fit (random label pairs, see
  ``_prepare.heldout_labels``): the real-data measure of stitching quality;
- ``never``: never recorded together: predictions only, scored against the true covariances
  when the data are simulated.

Empirical covariances are computed on a sample of at most ``max_neurons`` neurons (dense
``(K, m, m)`` over the sample only), pooled over the recordings that hold both neurons,
exactly as the fit pools them. Per lag and class: Pearson correlation between predicted and
empirical (or true) covariances and the relative error ``||pred - emp|| / ||emp||``. The lag-0
diagonal (variances, fitted by R) is left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.linalg
import torch

from ._data import StitchedData
from .models import StitchedLDSParams


def sample_neurons(data: StitchedData, max_neurons: int, seed: int) -> np.ndarray:
    """Sorted positions of at most ``max_neurons`` observed neurons, drawn evenly from every
    group so that small groups (the overlaps) are represented."""
    rng = np.random.default_rng([seed, 11])
    observed = np.flatnonzero(data.group_of >= 0)
    if len(observed) <= max_neurons:
        return observed
    per_group = max(2, max_neurons // max(1, data.n_groups))
    picks = []
    for g in range(data.n_groups):
        members = np.flatnonzero(data.group_of == g)
        picks.append(rng.choice(members, min(per_group, len(members)), replace=False))
    pick = np.unique(np.concatenate(picks))
    if len(pick) > max_neurons:
        pick = np.sort(rng.choice(pick, max_neurons, replace=False))
    return pick


def pooled_sample(
    data: StitchedData,
    sample: np.ndarray,
    sums: Callable[[int, np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled lagged covariances of the sampled neurons, ``(cov (K, m, m), counts (K, m,
    m))``: ``cov[s, a, b] = sum over recordings of S_r(s)[a, b] / sum of (T_r - s)``, 0 where
    never co-observed; ``sums(k, cols)`` gives recording k's lagged sums (K, c, c) of its
    columns ``cols`` (from the data or from formed sums)."""
    K, m = data.lags, len(sample)
    pos = np.full(data.n_neurons, -1)
    pos[sample] = np.arange(m)
    S = np.zeros((K, m, m))
    N = np.zeros((K, m, m))
    for k, rec in enumerate(data.recordings):
        cols = np.flatnonzero(pos[rec.neurons] >= 0)
        if len(cols) == 0:
            continue
        idx = np.ix_(pos[rec.neurons[cols]], pos[rec.neurons[cols]])
        sub = sums(k, cols)
        for s in range(K):
            S[s][idx] += sub[s]
            N[s][idx] += rec.n_time - s
    return np.divide(S, N, out=np.zeros_like(S), where=N > 0), N


def empirical_sample(data: StitchedData, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled empirical lagged covariances of the sampled neurons read from the data:
    ``(cov (K, m, m), counts (K, m, m))``, ``cov[s, a, b] = sum y_a[t+s] y_b[t] / count``;
    0 where never co-observed (:func:`pooled_sample`)."""
    dev = data.device

    def sums(k: int, cols: np.ndarray) -> np.ndarray:
        rec = data.recordings[k]
        y = torch.empty((rec.n_time, len(cols)), dtype=torch.float64, device=dev)
        c = torch.as_tensor(cols, device=dev)
        for t0, chunk in rec.chunks(dev):
            y[t0 : t0 + chunk.shape[0]] = chunk[:, c].to(torch.float64)
        T = rec.n_time
        return np.stack([(y[s:].T @ y[: T - s]).cpu().numpy() for s in range(data.lags)])

    return pooled_sample(data, sample, sums)


def mean_over_lags(rows: Sequence[dict[str, Any]], key: str = "corr") -> float | None:
    """The mean of ``key`` over the finite per-lag rows, or None when none is finite."""
    vals = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    return float(np.mean(vals)) if vals else None


def pair_classes(data: StitchedData, sample: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(K, m, m) int: 0 observed (fitted), 1 held out, 2 never co-observed, -1 lag-0 diagonal."""
    g = data.group_of[sample]
    held = data.heldout[g[:, None], g[None, :]]
    cls = np.where(counts > 0, np.where(held[None], 1, 0), 2)
    diag = np.arange(len(sample))
    cls[0, diag, diag] = -1
    return cls


def lag_stats(pred: np.ndarray, ref: np.ndarray, lengths: np.ndarray) -> list[dict]:
    """``{"n_pairs", "corr", "rel_error"}`` of consecutive segments of ``lengths`` values of
    the flat ``pred`` and ``ref`` (the pairs of one lag after another), in a few vectorised
    steps: Pearson's correlation and ``|pred - ref| / |ref|``; NaN for a segment of fewer
    than 3 values or with a constant side."""
    lengths = np.asarray(lengths, dtype=int)
    out: list[dict] = [
        {"n_pairs": int(n), "corr": float("nan"), "rel_error": float("nan")} for n in lengths
    ]
    keep = lengths > 0
    if not keep.any():
        return out
    n = lengths[keep]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[keep]

    def seg(x: np.ndarray) -> np.ndarray:
        return np.add.reduceat(x, starts)

    p = pred - np.repeat(seg(pred) / n, n)
    r = ref - np.repeat(seg(ref) / n, n)
    pp, rr, pr = seg(p * p), seg(r * r), seg(p * r)
    err, norm = np.sqrt(seg((pred - ref) ** 2)), np.sqrt(seg(ref * ref))
    for k, j in enumerate(np.flatnonzero(keep)):
        if n[k] >= 3 and pp[k] > 0 and rr[k] > 0:
            out[j]["corr"] = float(pr[k] / np.sqrt(pp[k] * rr[k]))
            out[j]["rel_error"] = float(err[k] / norm[k])
    return out


CLASSES = ("observed", "heldout", "never")


def class_index(cls: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per pair class of ``cls`` (K, m, m) (:data:`CLASSES`), the flat positions of its
    pairs, lag by lag, and their number per lag (K,)."""
    K = cls.shape[0]
    out = []
    for k in range(len(CLASSES)):
        flat = np.flatnonzero(cls == k)  # C order: lag by lag
        out.append((flat, np.bincount(flat // cls[0].size, minlength=K)))
    return out


def class_scores(
    pred: np.ndarray,
    emp: np.ndarray,
    cls: np.ndarray,
    true: np.ndarray | None = None,
    index: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, list[dict[str, float | int]]]:
    """Per lag, ``{"n_pairs", "corr", "rel_error"}`` of the predicted (K, m, m) against the
    empirical covariances for the ``observed`` and ``heldout`` classes of ``cls`` (see
    :func:`pair_classes`), and with ``true``, every class (``never`` too) against the truth
    (``<class>_vs_truth``). ``index``: :func:`class_index` of ``cls``, where many
    predictions are scored on the same pairs."""
    out: dict[str, list] = {}
    index = class_index(cls) if index is None else index
    pred, emp = pred.ravel(), emp.ravel()
    for k, (name, (flat, lengths)) in enumerate(zip(CLASSES, index, strict=True)):
        if k < 2:
            out[name] = lag_stats(pred[flat], emp[flat], lengths)
        if true is not None:
            out[f"{name}_vs_truth"] = lag_stats(pred[flat], true.ravel()[flat], lengths)
    return out


def lagged_prediction(params: StitchedLDSParams, sample: np.ndarray) -> np.ndarray:
    """``C_i X_s C_j'`` of the sampled neurons: (K, m, m)."""
    Cs = params.C[sample]
    return (Cs @ params.X) @ Cs.T  # (K, m, n) @ (n, m): BLAS, where einsum is not


def covariance_scores(
    params: StitchedLDSParams,
    data: StitchedData,
    *,
    truth: StitchedLDSParams | None = None,
    max_neurons: int = 600,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-lag correlation and relative error of predicted lagged covariances, per pair class
    (module docstring); with ``truth``, also every class against the true covariances.

    Returns ``{"lags": [...], "observed": [...], "heldout": [...], "never": [...], ...}`` with
    one ``{"n_pairs", "corr", "rel_error"}`` per lag, and the sample for the figures.
    """
    sample = sample_neurons(data, max_neurons, seed)
    emp, counts = empirical_sample(data, sample)
    cls = pair_classes(data, sample, counts)
    K = data.lags
    pred = lagged_prediction(params, sample)
    out: dict[str, Any] = {"lags": list(range(K)), "n_sampled_neurons": int(len(sample))}
    true = None
    if truth is not None:
        true = lagged_prediction(truth, sample)
    out.update(class_scores(pred, emp, cls, true))
    out["_figure"] = {"sample": sample, "pred": pred, "emp": emp, "true": true, "cls": cls}
    return out


def principal_angles_deg(C_true: np.ndarray, C_fit: np.ndarray) -> list[float]:
    """Principal angles (degrees, largest first) between the column spaces of two loadings."""
    return np.degrees(scipy.linalg.subspace_angles(C_true, C_fit)).tolist()


def matched_eigenvalues(A_true: np.ndarray, A_fit: np.ndarray) -> dict[str, list]:
    """Eigenvalues of both matrices, each fitted one matched to the nearest true one (Hungarian
    assignment on |difference|)."""
    from scipy.optimize import linear_sum_assignment

    lt, lf = np.linalg.eigvals(A_true), np.linalg.eigvals(A_fit)
    cost = np.abs(lt[:, None] - lf[None, :])
    r, c = linear_sum_assignment(cost)
    return {
        "true": [[float(z.real), float(z.imag)] for z in lt[r]],
        "fitted": [[float(z.real), float(z.imag)] for z in lf[c]],
        "max_abs_error": float(cost[r, c].max()) if len(r) else 0.0,
    }


def symmetry_dimension(A: np.ndarray, Pi: np.ndarray, tol: float = 1e-8) -> int:
    """Dimension of ``{S : S A = A S, S Pi + Pi S' = 0}``, the continuous transformations
    ``C_r -> C_r T`` (``T = exp(S)``) of one recording's loadings that leave every lagged
    covariance within it unchanged. Recordings not linked through shared neurons can be moved
    independently by such T (and always by T = -I): their cross-covariances are determined
    only up to these."""
    n = A.shape[0]
    cols = []
    for a in range(n):
        for b in range(n):
            E = np.zeros((n, n))
            E[a, b] = 1.0
            cols.append(np.concatenate([(E @ A - A @ E).ravel(), (E @ Pi + Pi @ E.T).ravel()]))
    M = np.array(cols).T
    sv = np.linalg.svd(M, compute_uv=False)
    return int(np.sum(sv <= tol * max(1.0, sv[0])))


def identifiability(params: StitchedLDSParams, data: StitchedData) -> dict[str, Any]:
    """Connected components of the overlap graph and, when there are several, the symmetries
    left between them (see :func:`symmetry_dimension`)."""
    from .models import overlap_graph

    _, comp = overlap_graph(data)
    groups: dict[int, list[str]] = {}
    for rec, c in zip(data.recordings, comp, strict=True):
        groups.setdefault(c, []).append(rec.name)
    out: dict[str, Any] = {"components": list(groups.values())}
    if len(groups) > 1:
        dim = symmetry_dimension(params.A, params.Pi)
        out["sign_ambiguous"] = True
        out["symmetry_dim"] = dim
        out["note"] = (
            f"{len(groups)} groups of recordings share no neuron: the covariances between "
            "them are determined only up to a sign flip of each group's loadings"
            + (f" and a {dim}-dimensional family of rotations" if dim else "")
            + " that leave A and Pi unchanged"
        )
    else:
        out["sign_ambiguous"] = False
        out["symmetry_dim"] = 0
    return out
