"""Poisson LDS over trials from a dataset store to result files.

:func:`fit_store` fits, with latent dimension k, the non-stationary model (``nplds``), the
stationary one (``plds``) and, when asked, the variant with drifting dynamics
(``nplds_dynamics``) on the same training trials, scores them on the same held-out trials and
neurons, and writes under ``results/<dataset>/``::

    <model>/k<k>/model.zarr   C (N_total, k) in the store's neuron order (NaN rows: neurons the
                              recording lacks), d (N_total,), A, Q, V0 (k, k), x0 (k,),
                              h_mean, h_var (trials, k), trial_ids, heldout (trials,) bool,
                              sigma2, tau (k,) (plds: sigma2 = 0, tau = NaN), bound_trace;
                              with the neurons' own drift e_mean, e_var (trials,
                              N_total), e_tau;
                              with the time offset also offset, offset_var (T, N_total)
                              its posterior mean and variance, offset_sf2, offset_lf_bins;
                              nplds_dynamics also A1 (k, k), g_mean, g_var (trials,), tau_g,
                              A_trials (trials, k, k) = A + g_mean A1
    <model>/k<k>/latents.zarr recordings/<name>/mean, var (trials, T, k) float32: posterior
                              means and marginal variances of the latents, NaN on held-out
                              trials (the layout of every model, :mod:`poplds._outputs`)
    nplds/k<k>/metrics.json   every model's scores (poplds.nplds.evaluate), bound trace,
                              iterations, time; recovery against the truth when simulated
    nplds/k<k>/predictions.npz  per-trial arrays for the figures

Trials are in the store's order in every array. Files are written under temporary names and
renamed, so an interrupted run leaves no half-written result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._checkpoint import remove_checkpoints
from .._device import choose_device
from .._errors import InputError
from .._logging import get_logger
from .._outputs import MODELS, write_latents
from .._provenance import provenance
from .._results import StoreFit, atomic_group, finish_group, unexpected_nonfinite, write_json
from .._settings import config_settings
from .._version import __version__
from ..store import DatasetStore, write_array, write_strings
from . import bands, model, vi
from ._trials import Trials, load_truth, read_trials
from .baselines import (
    cosmoothing_baselines,
    gpfa_cosmoothing,
    heldout_trial_baselines,
    nlb_smoothing_glm,
)
from .evaluate import centred_correlation, evaluate, trial_mean
from .intervals import paired_intervals, trial_sums
from .settings import NPLDSSettings

log = get_logger()


@dataclass(frozen=True)
class NPLDSOutputs:
    """The files one job of Poisson LDS fits writes (module docstring): ``metrics`` (JSON),
    ``predictions`` (the figures' per-trial arrays, npz) and, per model name, its
    ``model.zarr`` (``models``) and ``latents.zarr`` (``latents``)."""

    metrics: Path
    predictions: Path
    models: Mapping[str, Path]
    latents: Mapping[str, Path]

    @classmethod
    def under(cls, results_dir: str | Path, latent_dim: int, models: Sequence[str]) -> NPLDSOutputs:
        """The README layout: ``<results_dir>/nplds/k<k>/{metrics.json,predictions.npz}`` and
        ``<results_dir>/<model>/k<k>/{model,latents}.zarr``."""
        d, k = Path(results_dir), f"k{int(latent_dim)}"
        return cls(
            d / "nplds" / k / "metrics.json",
            d / "nplds" / k / "predictions.npz",
            {m: d / m / k / "model.zarr" for m in models},
            {m: d / m / k / "latents.zarr" for m in models},
        )

    @classmethod
    def from_mapping(cls, paths: Mapping[str, Any], models: Sequence[str]) -> NPLDSOutputs:
        """From a mapping with ``metrics``, ``predictions`` and, per model name, ``<model>``
        (its model.zarr) and ``<model>_latents`` (e.g. a rule's ``snakemake.output``)."""
        return cls(
            Path(paths["metrics"]),
            Path(paths["predictions"]),
            {m: Path(paths[m]) for m in models},
            {m: Path(paths[f"{m}_latents"]) for m in models},
        )


#: The evaluator's scored log rates (:func:`.evaluate.evaluate` ``arrays``) by score.
SCORED_LOG_RATES = {"heldout_trial": "heldout_log_rate", "cosmoothing": "cosmoothing_log_rate"}

#: Seconds between two checkpoints of a fit in progress.
CHECKPOINT_EVERY_S = 60.0


def from_stationary(plds: model.PLDSParams, drifting: model.PLDSParams) -> model.PLDSParams:
    """A start for a drift model from a fitted PLDS: its C, d, A, Q, x0, V0 with the drift
    model's own start for the GP (and dynamics-drift) hyperparameters."""
    return replace(
        plds,
        log_sigma2=drifting.log_sigma2.clone().fill_(math.log(1e-2)),
        log_tau=drifting.log_tau,
        A1=None if drifting.A1 is None else 0.05 * plds.A,
        log_tau_g=drifting.log_tau_g,
        log_se2=drifting.log_se2,
        log_le=drifting.log_le,
    )


def _spectral_radius(A: np.ndarray) -> np.ndarray:
    return np.abs(np.linalg.eigvals(A)).max(-1)


def _run_metrics(store: DatasetStore, d: Trials, settings: dict, dev) -> dict[str, Any]:
    """metrics.json's description of the run (its ``models`` filled in later)."""
    R, T, N = d.y.shape
    return {
        "dataset": store.attrs.get("dataset"),
        "settings": settings,
        "n_trials": R,
        "n_bins": T,
        "n_neurons": N,
        "bin_size_s": d.bin_s,
        "n_heldout_trials": int(len(d.test)),
        "heldout_trial_ids": d.trial_ids[d.test].tolist(),
        "n_heldout_neurons": int(d.held.sum()),
        "warnings": d.warnings,
        "spikes": int(np.nansum(d.y)),
        "missing_bins": int(np.isnan(d.y).sum()),
        "missing_fraction": float(np.isnan(d.y).mean()),
        "trials_as_ingested": {
            key: store.recording_attrs(store.recording_names[0]).get(key)
            for key in (
                "trial_crop",
                "trial_duration_s",
                "trial_time_kept_fraction",
                "trial_spikes_kept_fraction",
            )
        },
        "models": {},
        "poplds_version": __version__,
        "provenance": provenance(dev),
    }


def _fit_model(name: str, d: Trials, k: int, s: NPLDSSettings, dev, ckpt_dir: Path, stationary):
    """Fit one model on the training trials: ``(fit, start, iterations over all starts)``.
    A drift model that ends below the stationary fit's bound (a worse local optimum) is
    fitted again from the stationary fit, and the better of the two is kept."""
    drift, dyn = MODELS[name].drift, MODELS[name].dynamics_drift
    y, n, train = d.y, d.n, d.train
    log.info("fitting %s, k = %d, %d training trials on %s", name, k, len(train), dev)
    opts = {"drift": drift, "dynamics_drift": dyn, "max_iter": s.max_iter, "tol": s.tol}
    opts["offset"] = s.time_offset
    opts["min_drift_trials"] = s.drift_min_trials
    opts["neuron_drift"] = s.neuron_drift
    opts["checkpoint_every_s"] = CHECKPOINT_EVERY_S
    opts["inputs"] = None if d.u is None else d.u[train]
    fit = vi.fit(y[train], n[train], k, device=dev, checkpoint=ckpt_dir / f"{name}.ckpt", **opts)
    start, iterations_all = "moments", fit.iterations
    if drift and stationary is not None and fit.bound[-1] < stationary.bound[-1]:
        log.warning(
            "%s k=%d ended below the stationary fit's bound (%.6g < %.6g): a worse local "
            "optimum; fitting it again from the stationary fit",
            name,
            k,
            fit.bound[-1],
            stationary.bound[-1],
        )
        again = vi.fit(
            y[train],
            n[train],
            k,
            device=dev,
            init=from_stationary(stationary.params, fit.params),
            checkpoint=ckpt_dir / f"{name}-from-plds.ckpt",
            **opts,
        )
        iterations_all += again.iterations
        if again.bound[-1] > fit.bound[-1]:
            fit, start = again, "plds"
    return fit, start, iterations_all


def _status(fit: vi.FitResult) -> dict[str, Any]:
    """How a fit ended, as metrics.json and model.zarr record it."""
    return {
        "iterations": fit.iterations,
        "converged": fit.converged,
        "stop": "converged" if fit.converged else "max_iter",
        "bound_start": fit.bound[0],
        "bound_rise": fit.bound[-1] - fit.bound[0],
        "extrapolations_kept": fit.extrapolations,
    }


def _score_model(name, fit, start, iterations_all, d: Trials, truth_d, figure, seconds_from, s):
    """Score one fitted model on the held-out trials and neurons: its metrics entry, and its
    arrays for the figures (into ``figure``) and the model.zarr (``h_mean``, ``h_var``,
    ``A_trials``, the scorer's ``arrays``). The drift figure's line and band are the
    modulator's posterior with the GP hyperparameters integrated out (:mod:`.bands`)."""
    tt, y, n, train, test = d.tt, d.y, d.n, d.train, d.test
    u_train = u_test = None
    if d.u is not None:
        u_train, u_test = tt(d.u[train]), tt(d.u[test])
    scores, arrays = evaluate(
        fit,
        tt(y[train]),
        tt(n[train]),
        tt(y[test]),
        tt(n[test]),
        d.held,
        d.bin_s,
        u_train=u_train,
        u_test=u_test,
        min_drift_trials=s.drift_min_trials,
    )
    seconds = time.perf_counter() - seconds_from
    p = fit.params
    C = p.C.cpu().numpy()
    h_mean = arrays["h_mean"].cpu().numpy()[d.inverse]
    h_var = arrays["h_var"].cpu().numpy()[d.inverse]
    # the drift of every neuron's log rate: shared, and its own; q(h)'s band is too narrow
    shift_mf, sd_mf = shift, shift_sd = bands.shift_band(h_mean, h_var, C)
    if "h_band_mean" in arrays:  # h's band, and the loadings' own error
        band_mean = arrays["h_band_mean"].cpu().numpy()[d.inverse]
        band_var = arrays["h_band_var_centred"].cpu().numpy()[d.inverse]  # d has the mean
        shift, shift_sd = bands.shift_band(band_mean, band_var, C, arrays["C_cov"].cpu().numpy())
    if p.neuron_drift:
        shift = shift + arrays["e_mean"].cpu().numpy()[d.inverse]
        shift_sd = np.sqrt(shift_sd**2 + arrays["e_var"].cpu().numpy()[d.inverse])
    entry: dict[str, Any] = {
        **scores,
        "bound": fit.bound[-1],
        "bound_per_spike": fit.bound[-1] / max(float(np.nansum(y[train])), 1.0),
        **_status(fit),
        "skipped_steps": fit.skipped_steps,
        "guards": fit.guards,
        "start": start,
        "iterations_all_starts": iterations_all,
        "fit_seconds": fit.seconds,
        "seconds": seconds,
        "drift_sd": float(np.sqrt((shift - shift.mean(0)).var(0).mean())),
        "bound_trace": fit.bound,
    }
    if p.drift:
        entry["sigma2"] = np.exp(p.log_sigma2.cpu().numpy()).tolist()
        entry["tau"] = np.exp(p.log_tau.cpu().numpy()).tolist()
    if p.neuron_drift:
        entry["neuron_drift_sd"] = float(np.exp(0.5 * p.log_se2.cpu().numpy()).mean())
        entry["neuron_drift_tau"] = float(np.exp(p.log_le.cpu().numpy()))
    if p.offset:
        entry["offset_sd"] = float(np.exp(0.5 * p.log_sf2.cpu().numpy()).mean())
        entry["offset_lf_bins"] = float(np.exp(p.log_lf.cpu().numpy()))
    A_trials = None
    if MODELS[name].dynamics_drift:
        g = arrays["g_mean"].cpu().numpy()[d.inverse]
        A_trials = p.A.cpu().numpy() + g[:, None, None] * p.A1.cpu().numpy()
        entry["tau_g"] = float(np.exp(p.log_tau_g.cpu().numpy()))
        radius = _spectral_radius(A_trials)
        entry["radius_range"] = [float(radius.min()), float(radius.max())]
        figure[f"{name}_eigenvalues"] = np.linalg.eigvals(A_trials)
    if truth_d is not None:
        entry["drift_corr_vs_truth"] = centred_correlation(shift, truth_d["log_rate_shift"])
        if p.drift:  # share of (trial, neuron) whose true shift lies in the 95 % band
            true_c = truth_d["log_rate_shift"] - truth_d["log_rate_shift"].mean(0)
            err = np.abs(true_c - (shift - shift.mean(0)))
            entry["drift_band_coverage"] = float((err <= 1.96 * shift_sd).mean())
            entry["drift_band_coverage_mean_field"] = float(
                (np.abs(true_c - (shift_mf - shift_mf.mean(0))) <= 1.96 * sd_mf).mean()
            )
        if A_trials is not None and "A_trials" in truth_d:
            entry["radius_corr_vs_truth"] = float(
                np.corrcoef(_spectral_radius(A_trials), figure["true_radius"])[0, 1]
            )
    figure[f"{name}_rate"] = arrays["rate"].cpu().numpy()[d.inverse]
    figure[f"{name}_shift"] = shift
    figure[f"{name}_shift_sd"] = shift_sd
    figure[f"{name}_bound"] = np.asarray(fit.bound)
    entry["nonfinite_written"] = unexpected_nonfinite(
        {"A": p.A, "Q": p.Q, "x0": p.x0, "V0": p.V0, "C": C, "h_mean": h_mean, "h_var": h_var}
    )
    return entry, {"h_mean": h_mean, "h_var": h_var, "A_trials": A_trials, "arrays": arrays}


def _model_warnings(name: str, k: int, fit, start: str, entry: dict, s: NPLDSSettings):
    """Warnings (also logged) for a fit that barely moved, steps skipped after a numerical
    failure, a fit stopped at its cap and non-finite results."""
    out = []
    moved = fit.bound[-1] - fit.bound[0]
    if start == "moments" and fit.converged and moved <= 10 * s.tol * abs(fit.bound[-1]):
        out.append(
            f"{name} k={k} barely moved from its start (the bound rose {moved:.3g}): the "
            "result is essentially the start"
        )
    if fit.skipped_steps:
        out.append(
            f"{name} k={k}: steps kept their current value after a numerical failure "
            f"{sum(fit.skipped_steps.values())} times ({fit.skipped_steps})"
        )
    if not fit.converged:
        out.append(
            f"{name} k={k} stopped at nplds.max_iter ({s.max_iter}) before its convergence "
            f"test held (bound rose {vi.recent_gain(fit.bound):.3g} over the last "
            f"{vi.WINDOW} iterations); raise max_iter"
        )
    if any(entry["nonfinite_written"].values()):
        bad = {key: v for key, v in entry["nonfinite_written"].items() if v}
        out.append(f"{name} k={k}: non-finite values in the results: {bad}")
    for w in out:
        log.warning(w)
    return out


def _latents(fit, d: Trials, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The latents' means and marginal variances (trials, T, k) float32, NaN on held-out
    trials."""
    R, T = d.y.shape[:2]
    x_mean = np.full((R, T, k), np.nan, dtype=np.float32)
    x_mean[d.train] = fit.state.m.cpu().numpy()
    x_var = np.full((R, T, k), np.nan, dtype=np.float32)
    x_var[d.train] = torch.diagonal(fit.state.S, dim1=-2, dim2=-1).cpu().numpy()
    return x_mean, x_var


def fit_store(
    store_path: str | Path,
    latent_dim: int,
    settings: NPLDSSettings | None = None,
    *,
    outputs: NPLDSOutputs | None = None,
    truth: str | Path | None = None,
    checkpoints: str | Path | None = None,
) -> StoreFit:
    """Fit and score the Poisson LDS models (module docstring) on a store of trial counts and
    write their :class:`NPLDSOutputs` (default: the README layout beside the store).

    settings: :class:`NPLDSSettings` (default: the workflow's defaults); truth: a
    simulation's ``truth.npz``; checkpoints: a folder for each fit's checkpoint (default:
    ``checkpoint/`` beside the metrics), so that a job killed mid-way resumes where it was
    when run again; removed once every output is written. Returns a
    :class:`~poplds._results.StoreFit`: the metrics written to ``metrics.json``, the outputs,
    and each model's :class:`~poplds.nplds.FitResult` by name.

    Long by choice: it orders the job (read, fit, score, write) for every model; each step
    is a function of its own.
    """
    s = settings or NPLDSSettings()
    out = outputs or NPLDSOutputs.under(Path(store_path).parent, latent_dim, s.models)
    ckpt_dir = Path(checkpoints) if checkpoints else out.metrics.parent / "checkpoint"
    missing = [m for m in s.models if m not in out.models or m not in out.latents]
    if missing:
        raise InputError("outputs", f"no model.zarr or latents.zarr path for {missing}")
    store = DatasetStore(store_path)
    k = int(latent_dim)
    dev = choose_device(s.device, "nplds.device")
    d = read_trials(store, k, s, dev)
    truth_d = load_truth(truth, store.neuron_ids[d.neurons], d.trial_ids) if truth else None
    settings_run = {"latent_dim": k, **config_settings(s, NPLDSSettings.PYTHON_ONLY)}
    settings_run["device"] = str(dev)
    metrics = _run_metrics(store, d, settings_run, dev)
    figure: dict[str, np.ndarray] = {
        "trial_ids": d.trial_ids,
        "heldout": d.heldout,
        "observed_rate": trial_mean(d.tt(d.y), d.tt(d.y)).cpu().numpy() / d.bin_s,
        "bin_size_s": np.array(d.bin_s),
    }
    if truth_d is not None:
        figure["true_shift"] = truth_d["log_rate_shift"]
        if "A_trials" in truth_d:
            figure["true_radius"] = _spectral_radius(truth_d["A_trials"])
    fits: dict[str, vi.FitResult] = {}
    scored: dict[str, dict[str, np.ndarray]] = {"heldout_trial": {}, "cosmoothing": {}}
    stationary: vi.FitResult | None = None  # the PLDS fit, made first
    for name in s.models:
        t0 = time.perf_counter()
        fit, start, iterations_all = _fit_model(name, d, k, s, dev, ckpt_dir, stationary)
        if not MODELS[name].drift:
            stationary = fit
        entry, kept = _score_model(name, fit, start, iterations_all, d, truth_d, figure, t0, s)
        d.warnings.extend(_model_warnings(name, k, fit, start, entry, s))
        metrics["models"][name] = entry
        fits[name] = fit
        for score, key in SCORED_LOG_RATES.items():
            if key in kept["arrays"]:
                scored[score][name] = kept["arrays"][key].cpu().numpy()
        x_mean, x_var = _latents(fit, d, k)
        write_latents(
            out.latents[name], name, {store.recording_names[0]: (x_mean, x_var)}, __version__
        )
        _write_model(
            out.models[name],
            fit,
            store=store,
            neurons=d.neurons,
            trial_ids=d.trial_ids,
            heldout=d.heldout,
            h_mean=kept["h_mean"],
            h_var=kept["h_var"],
            arrays=kept["arrays"],
            inverse=d.inverse,
            A_trials=kept["A_trials"],
            settings={**settings_run, "model": name},
        )
        log.info(
            "%s k=%d: held-out trials %.4f bits/spike, co-smoothing %.4f, rate RMSE %.3f Hz",
            name,
            k,
            entry["heldout_trial_bits_per_spike"],
            entry["cosmoothing_bits_per_spike"],
            entry["rate_rmse_hz"],
        )
    metrics["baselines"], base_rates = _baselines(d, k, s.seed)
    if len(d.test):
        metrics["intervals"] = _intervals(d, scored, base_rates, s.seed)
    mm = metrics["models"]
    metrics["comparison"] = {
        "nplds_minus_plds_heldout_bits_per_spike": _diff(mm, "heldout_trial_bits_per_spike"),
        "nplds_minus_plds_cosmoothing_bits_per_spike": _diff(mm, "cosmoothing_bits_per_spike"),
        "nplds_minus_plds_rate_rmse_hz": _diff(mm, "rate_rmse_hz"),
    }
    for path in (out.predictions, out.metrics):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.predictions.with_name(out.predictions.stem + ".tmp.npz")
    np.savez_compressed(tmp, **figure)
    tmp.replace(out.predictions)
    write_json(out.metrics, metrics)
    remove_checkpoints(ckpt_dir)
    return StoreFit(metrics, out, fits)


def _baselines(
    d: Trials, k: int, seed: int
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, np.ndarray]]]:
    """The field's baselines (:mod:`.baselines`) on the models' own split, scored the same
    way: ``{name: {score key: bits/spike, "widths": {...}}}``, and their log rates by score
    (``heldout_trial``, ``cosmoothing``) and name; GPFA at the job's k."""
    found: dict[str, dict[str, Any]] = {
        "heldout_trial": heldout_trial_baselines(d.y, d.heldout, d.n),
        "cosmoothing": {},
    }
    if d.held.any():
        co = found["cosmoothing"]
        co.update(cosmoothing_baselines(d.y, d.heldout, d.held))
        co["nlb_glm"] = nlb_smoothing_glm(d.y, d.heldout, d.held, d.bin_s, seed=seed)
        try:
            co[f"gpfa_k{k}"] = gpfa_cosmoothing(d.y, d.heldout, d.held, k, d.bin_s, seed=seed)
        except ImportError as exc:  # elephant is a dependency; say so if it is missing
            log.warning("GPFA baseline skipped: %s", exc)
    out = {
        name: {f"{score}_bits_per_spike": b.bits_per_spike, "widths": b.widths}
        for score, found_score in found.items()
        for name, b in found_score.items()
    }
    rates = {score: {n: b.log_rate for n, b in bs.items()} for score, bs in found.items()}
    log.info(
        "baselines: %s",
        ", ".join(
            f"{name} {b.bits_per_spike:.4f}" for bs in found.values() for name, b in bs.items()
        ),
    )
    return out, rates


def _intervals(
    d: Trials,
    models: dict[str, dict[str, np.ndarray]],
    baselines: dict[str, dict[str, np.ndarray]],
    seed: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """Paired bootstrap intervals (:mod:`.intervals`) over the held-out trials and neurons of
    every model's and baseline's score, and of the differences that decide: N-PLDS - PLDS,
    N-PLDS - GPFA, and the best model (by its estimate) - the best baseline, per score."""
    out = {}
    for score, preds in models.items():
        y = d.y[d.test] if score == "heldout_trial" else d.y[d.test][..., d.held]
        named = {**preds, **{f"baseline: {k}": v for k, v in baselines[score].items()}}
        if not named or y.size == 0:
            continue
        sums = {name: trial_sums(y, lr) for name, lr in named.items()}
        point = {name: s.score() for name, s in sums.items()}
        pairs = [("nplds", "plds")]
        pairs += [("nplds", n) for n in point if n.startswith("baseline: gpfa_k")]
        best = {
            kind: max(
                (n for n in point if n.startswith("baseline: ") == is_base),
                key=lambda n: point[n],
                default=None,
            )
            for kind, is_base in (("model", False), ("baseline", True))
        }
        if best["model"] and best["baseline"]:
            pairs.append((best["model"], best["baseline"]))
        out[score] = paired_intervals(sums, pairs, seed=seed, keep_draws=("nplds",))
        out[score]["best"] = best
    return out


def _diff(models: dict, key: str) -> float | None:
    a, b = models["nplds"].get(key), models["plds"].get(key)
    if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)):
        return None
    return float(a - b)


def _write_model(
    path: Path,
    fit: vi.FitResult,
    *,
    store: DatasetStore,
    neurons: np.ndarray,
    trial_ids: np.ndarray,
    heldout: np.ndarray,
    h_mean: np.ndarray,
    h_var: np.ndarray,
    arrays: dict[str, torch.Tensor],
    inverse: np.ndarray,
    A_trials: np.ndarray | None,
    settings: dict,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    root, tmp = atomic_group(path)
    p = fit.params.to_numpy()
    n_total = len(store.neuron_ids)
    k = p["A"].shape[0]

    def full(value: np.ndarray, axis: int = 0) -> np.ndarray:
        """``value`` laid out over the store's neurons along ``axis`` (NaN where absent)."""
        value = np.moveaxis(np.asarray(value), axis, 0)
        out = np.full((n_total, *value.shape[1:]), np.nan)
        out[neurons] = value
        return np.moveaxis(out, 0, axis)

    write_array(root, "C", full(p["C"]))
    write_array(root, "d", full(p["d"]))
    for name in ("A", "Q", "x0", "V0"):
        write_array(root, name, p[name])
    if "B" in p:
        write_array(root, "B", p["B"])
    if fit.params.offset:  # (T, N_total), NaN where C's rows are
        write_array(root, "offset", full(p["f_mean"], axis=1))
        write_array(root, "offset_var", full(fit.params.f_var.cpu().numpy(), axis=1))
        write_array(root, "offset_sf2", full(np.exp(p["log_sf2"])))
        write_array(root, "offset_lf_bins", np.exp(p["log_lf"]).reshape(()))
    write_array(root, "h_mean", h_mean)
    write_array(root, "h_var", h_var)
    if fit.params.neuron_drift:  # (trials, N_total), NaN columns as C's rows
        for name in ("e_mean", "e_var"):
            write_array(root, name, full(arrays[name].cpu().numpy()[inverse], axis=1))
        write_array(root, "e_tau", np.exp(p["log_le"]).reshape(()))
    write_array(root, "trial_ids", trial_ids.astype(np.int64))
    write_array(root, "heldout", heldout)
    if fit.params.drift:
        write_array(root, "sigma2", np.exp(p["log_sigma2"]))
        write_array(root, "tau", np.exp(p["log_tau"]))
    else:
        write_array(root, "sigma2", np.zeros(k))
        write_array(root, "tau", np.full(k, np.nan))
    write_array(root, "bound_trace", np.asarray(fit.bound))
    if A_trials is not None:
        write_array(root, "A1", p["A1"])
        write_array(root, "g_mean", arrays["g_mean"].cpu().numpy()[inverse])
        write_array(root, "g_var", arrays["g_var"].cpu().numpy()[inverse])
        write_array(root, "tau_g", np.exp(p["log_tau_g"]).reshape(()))
        write_array(root, "A_trials", A_trials)
    write_strings(root, "neuron_ids", store.neuron_ids)
    root.attrs.update(
        {
            "model": settings["model"],
            "settings": settings,
            **_status(fit),
            "seconds": fit.seconds,
            "dataset_store": str(store.path),
            "poplds_version": __version__,
        }
    )
    finish_group(tmp, path)
