"""What a user can check of a stitched fit on their own data: stitch validation and
bootstrap intervals (:func:`check_fit`).

1. Per-atom lagged sums of every recording (:mod:`.bootstrap`; two passes over the data at
   most, none again after).
2. Stitch validation (:mod:`.validation`): a second fit, started from the point estimate and
   run on sub-matrices of the same sums, with a seeded part of the shared neurons hidden in
   each recording; its predictions of the pairs it never saw together are scored per lag.
3. ``B`` moving-block bootstrap replicates: each replicate's sums are formed from the atoms,
   and the point fit and the validation fit are refitted on them from their estimates
   (never re-read data). Every replicate is scored as the point estimate is, against its
   own resampled empirical covariances.
4. Percentile intervals (level ``interval_level``) of the sampled neurons' predicted lagged
   covariances and correlations, of A's eigenvalue moduli and time constants, and of every
   score; the scores' bootstrap standard errors (for the choice of n); coverage of the
   intervals (against the truth of a simulation; on real data, of the stitch-validation
   pairs, whose empirical values carry sampling noise of their own: there the interval is
   that of the difference ``empirical - predicted`` over the replicates, which holds both
   noises, and it covers when it contains 0).

The lagged sums need ``A K N_r^2`` floats per recording (``A`` atoms); where they exceed the
fit's moment budget even with the longest blocks allowed, every replicate is instead one
Gauss-Newton step from the estimate, its gradient formed from the stored projections and one
more pass (:func:`_projected_bootstrap`; ``_linear``, ``_projected``), and so are the
validation fit and its replicates (:func:`_projected_validation`; two passes more).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .._distributed import rank_and_size
from .._logging import get_logger
from ._data import StitchedData
from ._linear import GaussNewton, diag_gradient, projected_replicates
from ._projected import MAX_SCORED, draws, group_projections, replicate_data
from ._refit import (
    RefitPart,
    ReplicateLoss,
    batched_refit,
    replicate_bytes,
    replicate_groups,
    replicate_params,
)
from ._stage import StageRecord
from .bootstrap import (
    ATOMS_PER_BLOCK,
    MIN_BLOCKS,
    AtomMoments,
    atom_moments,
    block_length,
    block_rows,
    centred_interval,
    percentile_interval,
    resample_counts,
)
from .evaluate import (
    class_index,
    class_scores,
    lag_stats,
    lagged_prediction,
    mean_over_lags,
    pooled_sample,
)
from .models import StitchedFit, StitchedLDSParams
from .settings import StitchedSettings
from .validation import (
    ValidationPairs,
    choose_hidden,
    pooled_variance,
    reduced_data,
    validation_covariances,
    validation_pairs,
    validation_predictions,
)

log = get_logger()

#: A refit's tolerance in multiples of ``tol`` (as the free stage's) and its convergence
#: window (passes): it starts at the estimate, and its spread over replicates is of the
#: order of the sampling noise itself.
REFIT_TOL, REFIT_WINDOW = 10.0, 5

#: The Gauss-Newton bootstrap warns when its replicates move the predicted covariances by
#: more than this share of their size (median over replicates): on the calibration
#: simulations, where its intervals match the refits', they moved 0.02-0.21; on the dentate
#: recording, where they differed from the refits' by 0.4-2x, 0.5-2.1.
LINEAR_CHANGE = 0.3

#: The range of each kind of score (a centred interval is clipped to it).
BOUNDS = {"corr": (-1.0, 1.0), "rel_error": (0.0, math.inf)}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The fits of the checks log errors only (their progress and whether they converged
    are logged and recorded here)."""
    old = log.level
    log.setLevel(max(old, logging.ERROR))
    try:
        yield
    finally:
        log.setLevel(old)


def refit(
    parts: Sequence[tuple[StitchedData, ReplicateLoss, list[np.ndarray], StitchedLDSParams]],
    settings: StitchedSettings,
) -> tuple[list[list[StitchedLDSParams]], StageRecord]:
    """The linked stage (C, A, Pi) of every replicate of every part ``(data, loss, variances,
    start)`` (one replicate for the validation fit), all in one run (``_refit``), reading no
    data."""
    with _quiet():
        return batched_refit(
            [RefitPart(data, loss, v, start) for data, loss, v, start in parts],
            tol=REFIT_TOL * settings.tol,
            window=REFIT_WINDOW,
            max_passes=settings.max_passes,
            seed=settings.seed,
        )


def sample_covariances(
    data: StitchedData, moments: Sequence[torch.Tensor], sample: np.ndarray
) -> np.ndarray:
    """Pooled lagged covariances (K, m, m) of the sampled neurons from every recording's
    formed lagged sums (:func:`.evaluate.pooled_sample`)."""

    def sums(k: int, cols: np.ndarray) -> np.ndarray:
        c = torch.as_tensor(cols, device=moments[k].device)
        return moments[k][:, c][:, :, c].cpu().numpy()

    return pooled_sample(data, sample, sums)[0]


def _plan_atoms(
    fit: StitchedFit, level_rows: list[int], budget: float
) -> tuple[list[int], int] | str:
    """Rows per atom of each recording and atoms per block, within ``budget`` bytes; or the
    reason none fits."""
    data = fit.data
    K = data.lags
    per_atom = [8.0 * K * len(r.neurons) ** 2 for r in data.recordings]
    for m in (ATOMS_PER_BLOCK, 2, 1):
        rows = [max(K, math.ceil(b / m)) for b in level_rows]
        need = sum(
            math.ceil(r.n_time / a) * p
            for r, a, p in zip(data.recordings, rows, per_atom, strict=True)
        )
        if need <= budget:
            return rows, m
    # longer blocks: as many as fit, at least MIN_BLOCKS per recording
    scale = sum(
        math.ceil(r.n_time / b) * p
        for r, b, p in zip(data.recordings, level_rows, per_atom, strict=True)
    ) / max(budget, 1.0)
    rows = [max(K, math.ceil(b * scale)) for b in level_rows]
    if all(r.n_time / a >= MIN_BLOCKS for r, a in zip(data.recordings, rows, strict=True)):
        return rows, 1
    need = sum(MIN_BLOCKS * p for p in per_atom)
    return (
        f"the recordings' lagged sums for {MIN_BLOCKS} blocks each need {need / 1e9:.3g} GB, "
        f"more than the fit's moment budget of {budget / 1e9:.3g} GB"
    )


def _projected_bytes(fit: StitchedFit, B: int) -> float:
    """Bytes the Gauss-Newton route holds at most: the projections (T_r, G_r, n) of every
    recording and about ten (B+1, N, n) arrays (the data terms, CG's vectors and products),
    for the bootstrap and again for the stitch validation (whose groups are finer: twice the
    projections allowed for)."""
    n = fit.params.C.shape[1]
    proj = sum(r.n_time * len(r.slices) * n for r in fit.data.recordings)
    return 8.0 * (3 * proj + 20 * (B + 1) * fit.data.n_neurons * n)


def _projected_bootstrap(
    fit: StitchedFit,
    s: StitchedSettings,
    sample: np.ndarray,
    cls: np.ndarray,
    true: np.ndarray | None,
    keep: int,
) -> tuple[list[StitchedLDSParams], list[dict], dict[str, Any], dict[str, Any], Any, list]:
    """The checks of a fit whose per-atom lagged sums do not fit in memory: one Gauss-Newton
    step per replicate (``_linear``) from the gradients that the stored projections and one
    more pass give (``_projected``), two passes over the data for the whole bootstrap; and
    the stitch validation the same way (:func:`_projected_validation`, two passes more).
    The replicates are scored on a seeded subset of the sampled neurons
    (``_projected.MAX_SCORED`` at most). Returns the replicates' parameters, their scores, the
    bootstrap's record, the validation's metrics, its ``(empirical, predicted)`` and the
    replicates' (as :func:`_intervals` takes them)."""
    data, p = fit.data, fit.params
    dev, K, B = data.device, data.lags, s.bootstrap
    tb = time.perf_counter()
    Z = [group_projections(rec, p.C[rec.neurons], dev) for rec in data.recordings]  # pass 1
    lengths = [  # on the recording's projections C_r' y = sum_g z_g
        block_length(z.sum(1).cpu().numpy(), K, rec.n_time)
        for z, rec in zip(Z, data.recordings, strict=True)
    ]
    atom_rows = [max(K, math.ceil(b / ATOMS_PER_BLOCK)) for b in lengths]
    n_atoms = [math.ceil(rec.n_time / a) for rec, a in zip(data.recordings, atom_rows, strict=True)]
    rng = np.random.default_rng([s.seed, 29])
    counts = [[resample_counts(A, ATOMS_PER_BLOCK, rng) for A in n_atoms] for _ in range(B)]
    draws_r = [
        draws(np.stack([c[k] for c in counts]), a, rec.n_time, K, dev)
        for k, (rec, a) in enumerate(zip(data.recordings, atom_rows, strict=True))
    ]
    m = min(MAX_SCORED, len(sample))  # the scored subset
    pick = np.sort(np.random.default_rng([s.seed, 31]).choice(len(sample), m, replace=False))
    scored = sample[pick]
    # the stitch validation's split, and a seeded subset of its pairs to score
    hidden = choose_hidden(data, s.validation_fraction, keep, s.seed)
    reduced = reduced_data(data, hidden, s.heldout_fraction) if hidden else None
    vpairs = _pair_subset(validation_pairs(data, reduced), s.seed) if reduced else []
    extra = [data.recordings[q.rec].neurons[np.r_[q.hidden, q.other]] for q in vpairs]
    summed = np.union1d(scored, np.concatenate(extra)) if extra else scored
    rd = replicate_data(data, p.C, p.X, Z, draws_r, atom_rows, summed)  # pass 2
    reps, products, residual = projected_replicates(data, p, rd.dD_dC, rd.CSC, rd.variances)
    # how far the replicates move: the linearisation holds while this is small
    P0 = lagged_prediction(p, scored)
    moved = float(
        np.median([np.linalg.norm(lagged_prediction(r, scored) - P0) for r in reps])
        / max(np.linalg.norm(P0), 1e-300)
    )
    cls_s = cls[:, pick][:, :, pick]
    true_s = None if true is None else true[:, pick][:, :, pick]
    index = class_index(cls_s)
    rep_scores = []
    for b, rep in enumerate(reps, start=1):

        def sums(k: int, cols: np.ndarray, b: int = b) -> np.ndarray:
            pos = torch.as_tensor(np.searchsorted(rd.sample_cols[k], cols))
            return rd.sample_sums[k][b][:, pos][:, :, pos].cpu().numpy()

        emp_b = pooled_sample(data, scored, sums)[0]
        rep_scores.append(class_scores(lagged_prediction(rep, scored), emp_b, cls_s, true_s, index))
    boot: dict[str, Any] = {
        "replicates": B,
        "level": s.interval_level,
        "method": "gauss_newton",
        "method_note": (
            "one Gauss-Newton step per replicate from the estimate, its gradient from the "
            "stored projections and one pass (the per-atom lagged sums exceed the budget)"
        ),
        "block_rows": [a * ATOMS_PER_BLOCK for a in atom_rows],
        "atom_rows": atom_rows,
        "atoms_per_block": ATOMS_PER_BLOCK,
        "block_length_rule": "Politis-White on the leading fitted latent projections",
        "cg_products": products,
        "cg_residual": residual,
        "scored_neurons": m,
        "replicate_change": moved,
    }
    warnings = []
    if residual > 1e-2:
        warnings.append(
            f"the Gauss-Newton steps' conjugate gradients stopped at a relative residual of "
            f"{residual:.2g}: the intervals may be off"
        )
    if moved > LINEAR_CHANGE:
        warnings.append(
            f"the bootstrap replicates change the predicted covariances by {moved:.2g} of "
            f"their size (median): one Gauss-Newton step reproduces refits only for small "
            f"changes (up to {LINEAR_CHANGE:g}; 0.02-0.21 on the calibration simulations), so "
            "these intervals are rough, and predictions that vary this much are weakly "
            "determined by the data"
        )
    if warnings:
        boot["warnings"] = warnings
        for w in warnings:
            log.warning(w)
    log.info(
        "bootstrap by Gauss-Newton steps: %d replicates, %d Hessian products, %.1f s",
        B,
        products,
        time.perf_counter() - tb,
    )
    if not vpairs:
        why = _no_validation(keep, s.validation_fraction)
        log.warning("stitch validation skipped: %s", why)
        return reps, rep_scores, boot, {"skipped": why}, None, []
    vm, val, rep_val = _projected_validation(fit, reduced, vpairs, draws_r, atom_rows, rd)
    vm.update({"keep": keep, "fraction": s.validation_fraction})
    vm["hidden"] = {data.recordings[k].name: v.tolist() for k, v in hidden.items()}
    return reps, rep_scores, boot, vm, val, rep_val


#: The Gauss-Newton route scores the stitch validation on at most this many hidden and other
#: neurons per recording (their lagged sums are kept for every replicate).
MAX_VALIDATION_HIDDEN, MAX_VALIDATION_OTHER = 40, 80


def _pair_subset(pairs: list[ValidationPairs], seed: int) -> list[ValidationPairs]:
    """A seeded subset of every recording's validation pairs (at most
    :data:`MAX_VALIDATION_HIDDEN` hidden and :data:`MAX_VALIDATION_OTHER` other neurons)."""
    rng = np.random.default_rng([seed, 37])
    out = []
    for q in pairs:
        h = np.sort(rng.permutation(q.hidden)[:MAX_VALIDATION_HIDDEN])
        o = np.sort(rng.permutation(q.other)[:MAX_VALIDATION_OTHER])
        out.append(ValidationPairs(q.rec, h, o))
    return out


def _projected_validation(
    fit: StitchedFit,
    reduced: Any,
    pairs: list[ValidationPairs],
    draws_r: list,
    atom_rows: list[int],
    rd: Any,
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray], list]:
    """The stitch validation by Gauss-Newton steps: the validation fit and its replicates
    are each one step from the point estimate on the reduced problem (the hidden pairs out
    of the loss), ``theta_vb = theta^ - (P/2) (J_v'J_v)^+ g_vb``, with ``g_vb`` the reduced
    loss's whole gradient at the estimate on replicate b's data (b = 0: the data), formed as
    the bootstrap's are (the reduced recordings' projections, one pass, and one more). Its
    pairs' empirical covariances come from the bootstrap's pass (``rd``, a subset of the
    pairs). Returns its metrics, ``(empirical, predicted)`` and every replicate's."""
    data, p = fit.data, fit.params
    red = reduced.data
    dev = data.device
    Z = [group_projections(rec, p.C[rec.neurons], dev) for rec in red.recordings]  # pass 3
    rdv = replicate_data(red, p.C, p.X, Z, draws_r, atom_rows, np.empty(0, int))  # pass 4
    B1 = rdv.dD_dC.shape[0]
    gn = GaussNewton(red, p, B1)
    V = torch.as_tensor(rdv.variances, device=dev)
    dC_diag, dX_diag = diag_gradient(gn, V)
    # the model's own term (data-free): the reduced loss with no data and zero variances,
    # whose diagonal term has no gradient (m_i >= 0)
    zero = ReplicateLoss(red, size=1)
    _, dC_sq, dX_sq = zero.value_and_grad(gn.theta[0][None], gn.X0[None])
    P = float(gn.tensors.n_pairs)
    dC = (dC_diag - 2 * rdv.dD_dC) / P + dC_sq
    dX = (dX_diag - 2 * rdv.CSC) / P + dX_sq
    steps, products, residual = gn.steps(dC, dX)
    fits = replicate_params(red, steps, list(rdv.variances))
    # empirical covariances of the pairs from the scored sums (positions among their columns)
    local = [
        ValidationPairs(
            q.rec,
            np.searchsorted(rd.sample_cols[q.rec], q.hidden),
            np.searchsorted(rd.sample_cols[q.rec], q.other),
        )
        for q in pairs
    ]
    n_time = [rec.n_time for rec in data.recordings]
    emp = [validation_covariances(local, [S[b] for S in rd.sample_sums], n_time) for b in range(B1)]
    pred = [validation_predictions(pairs, data, f.C, f.X) for f in fits]
    metrics = {
        "method": "gauss_newton",
        **_validation_scores(emp[0], pred[0]),
        "cg_products": products,
        "cg_residual": residual,
        "scored_hidden": int(sum(len(q.hidden) for q in pairs)),
    }
    log.info(
        "stitch validation by Gauss-Newton steps: %d pairs; r %.3f, relative error %.3f",
        metrics["n_pairs"],
        *(math.nan if v is None else v for v in (metrics["corr"], metrics["rel_error"])),
    )
    return metrics, (emp[0], pred[0]), list(zip(emp[1:], pred[1:], strict=True))


def _interval_rows(
    point: Sequence[dict], per_rep: list[list[dict]], level: float
) -> list[dict[str, Any]]:
    """Per lag, the interval of corr and rel_error (:func:`.bootstrap.centred_interval`)."""
    out = []
    for p0, lag_rows in zip(point, zip(*per_rep, strict=True), strict=True):
        out.append(
            {
                key: centred_interval(
                    p0[key], np.array([r[key] for r in lag_rows], dtype=float), level, BOUNDS[key]
                )
                for key in ("corr", "rel_error")
            }
        )
    return out


def _val_stats(pred: np.ndarray, emp: np.ndarray) -> list[dict]:
    """Per lag, the scores of the validation pairs' predictions (K, pairs)."""
    return lag_stats(pred.ravel(), emp.ravel(), np.full(pred.shape[0], pred.shape[1]))


def _no_validation(keep: int, fraction: float) -> str:
    """Why no recording takes part in the stitch validation."""
    return (
        f"no recording shares more than {keep} neurons with another beyond those it must "
        f"keep (at least {keep} per overlap, at most {fraction:.0%} hidden)"
    )


def _validation_scores(emp: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """The validation pairs' scores (K, pairs): their number, per lag, and the means."""
    rows = _val_stats(pred, emp)
    return {
        "n_pairs": int(emp.shape[1]),
        "lags": rows,
        "corr": mean_over_lags(rows, "corr"),
        "rel_error": mean_over_lags(rows, "rel_error"),
    }


def _eigen(A: np.ndarray, rate_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalue moduli of A, largest first, and their time constants ``-1 / (rate ln|l|)``
    in seconds."""
    mod = np.sort(np.abs(np.linalg.eigvals(A)))[::-1]
    with np.errstate(divide="ignore"):
        tau = -1.0 / (rate_hz * np.log(np.clip(mod, 1e-12, 1 - 1e-12)))
    return mod, tau


def check_fit(
    fit: StitchedFit,
    settings: StitchedSettings,
    latent_dim: int,
    *,
    scores: dict[str, Any],
    rate_hz: float,
    keep: int | None = None,
    method: str = "auto",
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Stitch validation and bootstrap of ``fit`` (module docstring). ``scores``: the
    estimate's :func:`.evaluate.covariance_scores` (its per-lag rows, and under ``_figure``
    the scored neurons and their pair classes: the replicates are scored on the same ones,
    and the score intervals are placed at these estimates); ``keep``: overlap every pair of
    recordings keeps in the validation (default n + 2); ``method``: ``refit`` (the
    replicates refitted on per-atom sums, with the stitch validation), ``gauss_newton``
    (one step per replicate from the projections, no validation: :func:`_projected_bootstrap`)
    or ``auto``, the first where its sums fit in the moment budget.

    Returns ``(metrics, arrays)``: ``metrics`` has ``stitch_validation`` and ``bootstrap``
    (each with ``skipped`` and the reason where it did not run); ``arrays`` are the
    intervals for ``covariance_sample.npz``.
    """
    t0 = time.perf_counter()
    data, p, s = fit.data, fit.params, settings
    dev, K = data.device, data.lags
    sample, cls = scores["_figure"]["sample"], scores["_figure"]["cls"]
    level = s.interval_level
    keep = latent_dim + 2 if keep is None else keep
    metrics: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    if rank_and_size()[1] > 1:
        why = "not run under several processes (run the fit on one to get them)"
        log.warning("stitch validation and bootstrap skipped: %s", why)
        return {"stitch_validation": {"skipped": why}, "bootstrap": {"skipped": why}}, arrays
    if s.bootstrap == 0 and s.validation_fraction == 0:
        return {
            "stitch_validation": {"skipped": "validation_fraction is 0"},
            "bootstrap": {"skipped": "bootstrap is 0"},
        }, arrays
    true = scores["_figure"]["true"]  # the sampled pairs' true covariances (simulations)
    index = class_index(cls)  # every replicate is scored on the same pairs
    per_atom = [8.0 * K * len(r.neurons) ** 2 for r in data.recordings]
    plan: tuple[list[int], int] | str = (
        f"the recordings' lagged sums for {MIN_BLOCKS} blocks each need "
        f"{MIN_BLOCKS * sum(per_atom) / 1e9:.3g} GB, more than the fit's moment budget of "
        f"{data.moment_budget / 1e9:.3g} GB"
    )
    if method not in ("auto", "refit", "gauss_newton"):
        raise ValueError(f"method must be auto, refit or gauss_newton, got {method!r}")
    if method == "gauss_newton":
        plan = "the Gauss-Newton bootstrap was asked for"
    elif method == "refit" or MIN_BLOCKS * sum(per_atom) <= data.moment_budget:
        lengths = [
            block_rows(rec, p.C[rec.neurons], K, dev) for rec in data.recordings
        ]  # pass 1: the fitted projections
        plan = _plan_atoms(fit, lengths, data.moment_budget)
    if isinstance(plan, str):
        log.warning(
            "%s: the bootstrap and the stitch validation take one Gauss-Newton step per "
            "replicate (and for the validation fit) from stored projections",
            plan,
        )
        if s.bootstrap == 0:
            why = f"{plan}, and this route runs the validation with the bootstrap (bootstrap 0)"
            metrics["stitch_validation"] = {"skipped": why}
            metrics["bootstrap"] = {"skipped": "bootstrap is 0"}
            return metrics, arrays
        need = _projected_bytes(fit, s.bootstrap)
        if need > 2 * data.moment_budget:
            metrics["bootstrap"] = {
                "skipped": (
                    f"the Gauss-Newton bootstrap needs about {need / 1e9:.3g} GB (projections "
                    f"and {s.bootstrap} replicates' loadings), more than twice the moment "
                    f"budget of {data.moment_budget / 1e9:.3g} GB (fewer replicates need less)"
                )
            }
            metrics["stitch_validation"] = {"skipped": metrics["bootstrap"]["skipped"]}
            log.warning("bootstrap skipped: %s", metrics["bootstrap"]["skipped"])
            return metrics, arrays
        reps, rep_scores, boot, vm, val, rep_val = _projected_bootstrap(
            fit, s, sample, cls, true, keep
        )
        metrics["stitch_validation"] = vm
        return _intervals(
            fit, s, scores, rate_hz, metrics, arrays, reps, rep_scores, boot, val, rep_val, t0
        )
    rows, per_block = plan
    atoms: list[AtomMoments] = [
        atom_moments(rec, K, a, per_block, dev)
        for rec, a in zip(data.recordings, rows, strict=True)
    ]  # pass 2
    full = [a.total() for a in atoms]
    n_time = [rec.n_time for rec in data.recordings]

    # stitch validation: the split; its fit is refitted with the first replicates
    hidden = choose_hidden(data, s.validation_fraction, keep, s.seed)
    reduced = reduced_data(data, hidden, s.heldout_fraction) if hidden else None
    pairs = validation_pairs(data, reduced) if reduced is not None else None
    val_fit: StitchedLDSParams | None = None
    B = s.bootstrap
    rng = np.random.default_rng([s.seed, 29])
    counts = [[resample_counts(a.n_atoms, a.per_block, rng) for a in atoms] for _ in range(B)]
    # a group's losses hold its replicates' sums (float32, the point fit's and the
    # validation's); one replicate's float64 sums are formed at a time
    per_rep = replicate_bytes(data) + (replicate_bytes(reduced.data) if pairs else 0.0)
    per_rep64 = sum(8.0 * K * len(r.neurons) ** 2 for r in data.recordings)
    groups = replicate_groups(B, per_rep, data.moment_budget) if B else [range(0)]
    reps: list[StitchedLDSParams] = []
    rep_scores: list[dict] = []
    rep_val: list[tuple[np.ndarray, np.ndarray]] = []
    evaluations, stops = 0, []
    for group in groups:
        tb = time.perf_counter()
        first = bool(pairs) and val_fit is None  # the validation fit itself, in the first run
        size = len(group)
        parts = []
        if size:
            loss, variances, emp = ReplicateLoss(data, size=size), [], []
            parts.append((data, loss, variances, p))
        if pairs:
            vloss, vvar, vemp = ReplicateLoss(reduced.data, size=size + first), [], []
            if first:
                S_v = reduced.moments(full)
                vvar.append(pooled_variance(reduced.data, S_v))
                vloss.set(0, S_v, vvar[-1])
            parts.append((reduced.data, vloss, vvar, p))
        # float64 sums formed a few replicates at a time (a quarter of the budget)
        step = max(1, int(0.25 * data.moment_budget // max(per_rep64, 1.0)))
        formed: list[torch.Tensor] = []
        for j in range(len(group)):
            if j % step == 0:
                batch = [counts[c] for c in group[j : j + step]]
                formed = [
                    a.replicates(np.stack([cb[k] for cb in batch])) for k, a in enumerate(atoms)
                ]
            S_b = [S[j % step] for S in formed]
            variances.append(pooled_variance(data, S_b))
            loss.set(j, S_b, variances[-1])
            emp.append(sample_covariances(data, S_b, sample))
            if pairs:
                S_v = reduced.moments(S_b)
                vvar.append(pooled_variance(reduced.data, S_v))
                vloss.set(first + j, S_v, vvar[-1])
                vemp.append(validation_covariances(pairs, S_b, n_time))
            del S_b
        del formed
        if not parts:
            continue
        fits, record = refit(parts, s)
        if first:
            val_fit, val_record = fits[-1].pop(0), record
        if size:
            evaluations += record.passes
            stops.append(record.stop)
            reps.extend(fits[0])
            for emp_b, fb in zip(emp, fits[0], strict=True):
                rep_scores.append(
                    class_scores(lagged_prediction(fb, sample), emp_b, cls, true, index)
                )
            if pairs:
                for emp_v, vb in zip(vemp, fits[-1], strict=True):
                    rep_val.append((emp_v, validation_predictions(pairs, data, vb.C, vb.X)))
            log.info(
                "bootstrap replicates %d-%d of %d refitted together%s: %d evaluations, %.1f s",
                group.start + 1,
                group.stop,
                B,
                " (with the validation fit)" if first else "",
                evaluations,
                time.perf_counter() - tb,
            )
    val = None
    if val_fit is not None:
        emp_v = validation_covariances(pairs, full, n_time)
        pred_v = validation_predictions(pairs, data, val_fit.C, val_fit.X)
        val = (emp_v, pred_v)
        metrics["stitch_validation"] = {
            "hidden": {data.recordings[k].name: v.tolist() for k, v in hidden.items()},
            "keep": keep,
            "fraction": s.validation_fraction,
            **_validation_scores(emp_v, pred_v),
            "passes": val_record.passes,
            "stop": val_record.stop,
        }
        if val_record.stop != "converged":
            metrics["stitch_validation"]["warnings"] = [
                f"the stitch-validation fit stopped at {val_record.stop} before its "
                "convergence test held"
            ]
            log.warning(metrics["stitch_validation"]["warnings"][0])
        log.info(
            "stitch validation: %d neurons hidden in %d recordings, %d pairs; r %.3f, "
            "relative error %.3f",
            sum(len(v) for v in hidden.values()),
            len(hidden),
            emp_v.shape[1],
            *(
                math.nan if v is None else v
                for v in (metrics["stitch_validation"][k] for k in ("corr", "rel_error"))
            ),
        )
    else:
        why = _no_validation(keep, s.validation_fraction)
        metrics["stitch_validation"] = {"skipped": why}
        log.warning("stitch validation skipped: %s", why)

    if B == 0:
        metrics["bootstrap"] = {"skipped": "bootstrap is 0"}
        return metrics, arrays
    boot: dict[str, Any] = {
        "replicates": s.bootstrap,
        "level": level,
        "method": "refit",
        "block_rows": [a.rows * a.per_block for a in atoms],
        "atom_rows": [a.rows for a in atoms],
        "atoms_per_block": per_block,
        "block_length_rule": "Politis-White on the leading fitted latent projections",
        "refit_evaluations": evaluations,
        "refit_stops": stops,
    }
    unconverged = sum(stop != "converged" for stop in stops)
    if unconverged:
        boot["warnings"] = [
            f"{unconverged} of the {len(stops)} batched bootstrap refits stopped before their "
            "convergence test held (stitched_lds.max_passes): the intervals may be too narrow"
        ]
        log.warning(boot["warnings"][0])
    return _intervals(
        fit, s, scores, rate_hz, metrics, arrays, reps, rep_scores, boot, val, rep_val, t0
    )


def _intervals(
    fit: StitchedFit,
    s: StitchedSettings,
    scores: dict[str, Any],
    rate_hz: float,
    metrics: dict[str, Any],
    arrays: dict[str, np.ndarray],
    reps: list[StitchedLDSParams],
    rep_scores: list[dict],
    boot: dict[str, Any],
    val: tuple[np.ndarray, np.ndarray] | None,
    rep_val: list[tuple[np.ndarray, np.ndarray]],
    t0: float,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The intervals, standard errors and coverage from the replicates' parameters
    ``reps``, scores ``rep_scores`` and (with the stitch validation) validation predictions
    ``rep_val``; fills ``metrics["bootstrap"]`` (from ``boot``) and ``arrays``."""
    p, K, level = fit.params, fit.data.lags, s.interval_level
    sample, cls = scores["_figure"]["sample"], scores["_figure"]["cls"]
    true = scores["_figure"]["true"]
    # covariances and correlations of the sample
    # per lag: B x m x m values at a time (m up to 600)
    pred_lo = np.empty((K, len(sample), len(sample)))
    pred_hi, corr_lo, corr_hi = (np.empty_like(pred_lo) for _ in range(3))
    var_b = np.stack(
        [np.einsum("ia,ab,ib->i", r.C[sample], r.X[0], r.C[sample]) + r.R[sample] for r in reps]
    )
    norm = np.sqrt(var_b[:, :, None] * var_b[:, None, :])
    for lag in range(K):
        pb = np.stack([r.C[sample] @ r.X[lag] @ r.C[sample].T for r in reps])
        pred_lo[lag], pred_hi[lag] = percentile_interval(pb, level)
        corr_lo[lag], corr_hi[lag] = percentile_interval(pb / norm, level)
    arrays.update({"pred_lo": pred_lo, "pred_hi": pred_hi, "corr_lo": corr_lo, "corr_hi": corr_hi})
    # eigenvalues and time constants
    eig = [_eigen(r.A, rate_hz) for r in reps]
    mod0, tau0 = _eigen(p.A, rate_hz)
    mlo, mhi = percentile_interval(np.stack([e[0] for e in eig]), level)
    tlo, thi = percentile_interval(np.stack([e[1] for e in eig]), level)
    boot["eigenvalue_modulus"] = {"value": mod0.tolist(), "lo": mlo.tolist(), "hi": mhi.tolist()}
    arrays.update({"eig_modulus_lo": mlo, "eig_modulus_hi": mhi, "tau_lo": tlo, "tau_hi": thi})
    boot["time_constant_s"] = {"value": tau0.tolist(), "lo": tlo.tolist(), "hi": thi.tolist()}
    # scores: each replicate's against its own resampled covariances
    point = scores  # the estimate's per-lag scores, as metrics.json reports them
    intervals: dict[str, Any] = {}
    for name in rep_scores[0]:
        intervals[name] = _interval_rows(point[name], [r[name] for r in rep_scores], level)
    summaries = {
        "observed_corr": ("observed", "corr"),
        "heldout_corr": ("heldout", "corr"),
        "heldout_rel_error": ("heldout", "rel_error"),
        "never_corr_vs_truth": ("never_vs_truth", "corr"),
    }
    summary_pairs = {
        key: (mean_over_lags(point[cl], stat), [mean_over_lags(r[cl], stat) for r in rep_scores])
        for key, (cl, stat) in summaries.items()
        if cl in point
    }
    if rep_val:
        emp_v, pred_v = val
        v0 = _val_stats(pred_v, emp_v)
        v_rows = [_val_stats(pv, ev) for ev, pv in rep_val]
        intervals["stitch_validation"] = _interval_rows(v0, v_rows, level)
        for stat in ("corr", "rel_error"):
            summary_pairs[f"stitch_{stat}"] = (
                mean_over_lags(v0, stat),
                [mean_over_lags(r, stat) for r in v_rows],
            )
        # coverage of the validation pairs: the interval of (empirical - predicted) holds 0
        d0 = emp_v - pred_v
        db = np.stack([ev - pv for ev, pv in rep_val]) - d0[None]
        lo, hi = percentile_interval(db, level)
        inside = (lo <= d0) & (d0 <= hi)
        metrics["stitch_validation"]["coverage"] = float(inside.mean())
        metrics["stitch_validation"]["coverage_by_lag"] = inside.mean(axis=1).tolist()
        vp_lo, vp_hi = percentile_interval(np.stack([pv for _, pv in rep_val]), level)
        arrays.update(
            {"val_emp": emp_v, "val_pred": pred_v, "val_pred_lo": vp_lo, "val_pred_hi": vp_hi}
        )
    boot["scores"] = intervals
    boot["summary"] = {}
    for key, (p0, reps_k) in summary_pairs.items():
        r = np.array(reps_k, dtype=float)
        ok = np.isfinite(r).sum() >= 2
        boot["summary"][key] = {
            "interval": centred_interval(
                p0, r, level, BOUNDS["corr" if "corr" in key else "rel_error"]
            ),
            "se": float(np.nanstd(r, ddof=1)) if ok else None,
        }
    if true is not None:  # coverage of the truth, per class
        cover = {}
        for k, name in enumerate(("observed", "heldout", "never")):
            sel = cls == k
            if sel.any():
                inside = (pred_lo <= true) & (true <= pred_hi)
                cover[name] = float(inside[sel].mean())
                cover[f"{name}_by_lag"] = [
                    float(inside[lag][sel[lag]].mean()) if sel[lag].any() else None
                    for lag in range(K)
                ]
        boot["coverage_vs_truth"] = cover
    boot["seconds"] = time.perf_counter() - t0
    metrics["bootstrap"] = boot
    log.info(
        "bootstrap: %d replicates (blocks of %s rows) in %.1f s",
        s.bootstrap,
        boot["block_rows"],
        boot["seconds"],
    )
    return metrics, arrays
