"""Stitched LDS from a dataset store to result files: fit, latents, evaluation.

:func:`fit_store` writes the files of :class:`StitchedOutputs` (by default the README layout,
``results/<dataset>/stitched_lds/n<n>/``)::

    model.zarr/    A (n, n), C (N_total, n) in the store's neuron order, Pi, Q (n, n),
                   R (N_total,), X (K, n, n), loss_trace (passes, 3: stage, pass, loss),
                   recordings/<name>/mean (N_r,) and neurons (N_r,) in the store's order
                   for that recording; attributes: settings, convergence, provenance
    latents.zarr/  recordings/<name>/mean, var (T_r, n) float32: smoothed means and
                   marginal variances, all recordings in one latent space
    covariance_sample.npz   the sampled neurons' predicted, empirical (and true) lagged
                   covariances and pair classes, for the figures
    metrics.json   per-lag covariance scores (observed, held-out, never co-observed vs truth),
                   principal angles and eigenvalues against the truth when simulated,
                   identifiability, timings, warnings

``C[i] A^s Pi C[j]'`` (plus ``R[i]`` when s = 0 and i = j) is the predicted covariance of
``y_i[t+s]`` and ``y_j[t]`` in the units of the ingested activity. Each file is written under a
temporary name and renamed, so an interrupted run leaves no half-written result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .._checkpoint import remove_checkpoints
from .._distributed import init_from_environment, launch, rank_and_size
from .._errors import InputError
from .._logging import get_logger
from .._outputs import write_latents
from .._provenance import provenance
from .._results import (
    StoreFit,
    atomic_group,
    finish_group,
    json_clean,
    unexpected_nonfinite,
    write_json,
)
from .._settings import config_settings
from .._version import __version__
from ..store import DatasetStore, damage_named, write_array, write_strings
from . import models
from ._prepare import RecordingInput
from .checks import check_fit
from .evaluate import (
    covariance_scores,
    identifiability,
    matched_eigenvalues,
    mean_over_lags,
    principal_angles_deg,
)
from .inference import smooth_recordings
from .models import StitchedFit, StitchedLDSParams
from .settings import StitchedSettings

log = get_logger()

#: Seconds between two checkpoints of a fit in progress.
CHECKPOINT_EVERY_S = 60.0


@dataclass(frozen=True)
class StitchedOutputs:
    """The files one stitched fit writes (module docstring): ``model``, ``latents`` (Zarr
    groups), ``metrics`` (JSON) and ``sample`` (the figures' covariance sample, npz)."""

    model: Path
    latents: Path
    metrics: Path
    sample: Path

    @classmethod
    def under(cls, results_dir: str | Path, latent_dim: int) -> StitchedOutputs:
        """The README layout: ``<results_dir>/stitched_lds/n<n>/...``."""
        d = Path(results_dir) / "stitched_lds" / f"n{int(latent_dim)}"
        return cls(
            d / "model.zarr", d / "latents.zarr", d / "metrics.json", d / "covariance_sample.npz"
        )

    @classmethod
    def from_mapping(cls, paths: Mapping[str, Any]) -> StitchedOutputs:
        """From a mapping with one path per field (e.g. a rule's ``snakemake.output``)."""
        return cls(**{f.name: Path(paths[f.name]) for f in fields(cls)})


def recordings_from_store(store: DatasetStore) -> list[RecordingInput]:
    """The store's recordings as lazy (time, neurons) inputs; trial data are refused."""
    out = []
    for name in store.recording_names:
        arr = store.root[f"recordings/{name}/activity"]
        if arr.ndim != 2:
            raise InputError(
                store.path,
                f"recording {name} has trials {tuple(arr.shape)}; stitched_lds needs continuous "
                "(time, neurons) recordings (use trials: false)",
            )
        out.append(RecordingInput(name, arr, store.neurons(name)))
    return out


def load_truth(path: str | Path, neuron_ids: np.ndarray, lags: int) -> StitchedLDSParams:
    """Simulated ground truth (``truth.npz`` of :mod:`poplds.simulate`) in the store's order."""
    z = np.load(path)
    pos = {nid: k for k, nid in enumerate(z["neuron_ids"].tolist())}
    try:
        order = np.array([pos[n] for n in neuron_ids.tolist()])
    except KeyError as exc:
        raise InputError(path, f"neuron {exc} of the store is not in the truth") from exc
    return StitchedLDSParams.from_dynamics(
        z["A"], z["C"][order], z["Q"], z["R"][order], z["Pi"], lags
    )


def evaluate_fit(
    fit: StitchedFit, truth: StitchedLDSParams | None, seed: int, max_neurons: int = 600
) -> dict[str, Any]:
    """metrics.json content (without settings) and the arrays the figures need."""
    scores = covariance_scores(
        fit.params, fit.data, truth=truth, max_neurons=max_neurons, seed=seed
    )
    summary = {
        "observed_corr": mean_over_lags(scores["observed"]),
        "heldout_corr": mean_over_lags(scores["heldout"]),
        "heldout_rel_error": mean_over_lags(scores["heldout"], "rel_error"),
    }
    metrics: dict[str, Any] = {"covariance": scores, "summary": summary}
    if truth is not None:
        summary["never_corr_vs_truth"] = mean_over_lags(scores["never_vs_truth"])
        summary["never_min_corr_vs_truth"] = min(
            (r["corr"] for r in scores["never_vs_truth"] if math.isfinite(r["corr"])),
            default=None,
        )
        metrics["truth"] = {
            "principal_angles_deg": principal_angles_deg(truth.C, fit.params.C),
            "eigenvalues": matched_eigenvalues(truth.A, fit.params.A),
        }
    metrics["identifiability"] = identifiability(fit.params, fit.data)
    return metrics


def fit_store(
    store_path: str | Path,
    latent_dim: int,
    settings: StitchedSettings | None = None,
    *,
    outputs: StitchedOutputs | None = None,
    truth: str | Path | None = None,
    checkpoints: str | Path | None = None,
) -> StoreFit:
    """Fit a stitched LDS of dimension ``latent_dim`` to every recording of a dataset store and
    write its :class:`StitchedOutputs` (default: the README layout beside the store).

    settings: :class:`StitchedSettings` (default: the workflow's defaults); truth: a
    simulation's ``truth.npz``; checkpoints: a folder for the fit's checkpoint (default:
    ``checkpoint/`` beside the metrics), so that a job killed mid-way resumes where it was
    when run again; removed once every output is written. Returns a
    :class:`~poplds._results.StoreFit`: the metrics (also in ``metrics.json``), the outputs,
    the :class:`StitchedFit` under ``stitched_lds``
    and each recording's :class:`~poplds.stitched.inference.Posterior` as ``latents``.

    With ``settings.processes`` > 1 the fit runs data-parallel on that many processes of
    this machine (one per GPU on CUDA, NCCL; gloo on CPUs), started as ``torchrun`` starts
    them (:func:`poplds._distributed.launch`); rank 0 writes the outputs, and the returned
    ``StoreFit`` holds the metrics and outputs only. Inside a process group that is already
    running (launched by ``torchrun`` itself), every rank takes part in the one fit.

    Long by choice: it orders the job (fit, latents, scores, metrics, files); each step is
    a function of its own.
    """
    s = settings or StitchedSettings()
    out = outputs or StitchedOutputs.under(Path(store_path).parent, latent_dim)
    ckpt_dir = Path(checkpoints) if checkpoints else out.metrics.parent / "checkpoint"
    init_from_environment(s.device)  # under torchrun: join its process group
    if s.processes > 1 and rank_and_size()[1] == 1:
        launch(_rank_main, s.processes, (str(store_path), latent_dim, s, out, truth, ckpt_dir))
        metrics = json.loads(out.metrics.read_text())
        return StoreFit(metrics, out, {}, [])
    store = DatasetStore(store_path)
    recs = recordings_from_store(store)
    neuron_ids = store.neuron_ids
    with damage_named(store):  # a chunk that cannot be decoded: say which, and what to do
        fit = models.fit(
            recs,
            len(neuron_ids),
            latent_dim,
            s,
            checkpoint=ckpt_dir / "fit.ckpt",
            checkpoint_every_s=CHECKPOINT_EVERY_S,
        )
        if rank_and_size()[0] != 0:  # rank 0 writes the results
            return StoreFit({}, out, {"stitched_lds": fit}, [])
        p = fit.params
        posts = smooth_recordings(p.A, p.Q, p.Pi, p.C, p.R, fit.data.recordings, fit.data.device)
        truth_params = load_truth(truth, neuron_ids, s.lags) if truth else None
        metrics = evaluate_fit(fit, truth_params, s.seed)
        checks, intervals = check_fit(
            fit,
            s,
            latent_dim,
            scores=metrics["covariance"],
            rate_hz=float(store.attrs["rate_hz"]),
            keep=s.validation_keep,
        )
        metrics.update(checks)
        _summarise_checks(metrics)
        metrics["covariance"]["_figure"].update(intervals)
    recorded = {
        "latent_dim": latent_dim,
        **config_settings(s, StitchedSettings.PYTHON_ONLY),
        "device": fit.info.device,
    }
    metrics.update(
        {
            "dataset": store.attrs.get("dataset"),
            "settings": recorded,
            "fit": {k: v for k, v in fit.info.as_dict().items() if k not in ("device", "warnings")},
            "n_neurons": int(len(neuron_ids)),
            "recordings": store.recording_names,
            "warnings": fit.info.warnings
            + [
                w
                for part in ("stitch_validation", "bootstrap")
                for w in metrics.get(part, {}).get("warnings", [])
            ],
            "left_out": {
                rec: {why: neuron_ids[pos].tolist() for why, pos in left.items()}
                for rec, left in fit.data.left_out.items()
            },
            "poplds_version": __version__,
            "provenance": provenance(fit.data.device),
        }
    )
    unfit = fit.data.group_of < 0  # left out of the fit: NaN rows by design
    written = {name: getattr(p, name) for name in ("A", "C", "Pi", "Q", "R", "X")}
    written.update(
        {
            f"latents/{post_name}": post.mean
            for post_name, post in zip((r.name for r in fit.data.recordings), posts, strict=True)
        }
    )
    metrics["nonfinite_written"] = unexpected_nonfinite(written, unfit)
    if any(metrics["nonfinite_written"].values()):
        bad = {k: v for k, v in metrics["nonfinite_written"].items() if v}
        metrics["warnings"].append(f"non-finite values in the results: {bad}")
        log.warning(metrics["warnings"][-1])
    for path in (out.model, out.latents, out.metrics, out.sample):
        path.parent.mkdir(parents=True, exist_ok=True)
    _write_model(out.model, fit, store, recorded, metrics)
    _write_latents(out.latents, fit, posts)
    fig = metrics["covariance"].pop("_figure")  # arrays for the figures, not metrics
    arrays = {k: v for k, v in fig.items() if v is not None}
    arrays["cls"] = arrays["cls"].astype(np.int8)  # pair classes -1..2
    tmp = out.sample.with_name(out.sample.stem + ".tmp.npz")
    # not compressed: lagged covariances of float64 shrink by 4-25 % at 5 s per 100 MB
    np.savez(tmp, **arrays, rate_hz=float(store.attrs["rate_hz"]))
    tmp.replace(out.sample)
    write_json(out.metrics, metrics)
    remove_checkpoints(ckpt_dir)
    return StoreFit(metrics, out, {"stitched_lds": fit}, posts)


def _summarise_checks(metrics: dict[str, Any]) -> None:
    """The stitch-validation scores and the bootstrap's intervals and standard errors of the
    summary scores, in ``metrics["summary"]`` (``<score>_interval``, ``<score>_se``)."""
    summary = metrics["summary"]
    val = metrics.get("stitch_validation", {})
    if "skipped" not in val:
        summary["stitch_corr"] = val["corr"]
        summary["stitch_rel_error"] = val["rel_error"]
        if "coverage" in val:
            summary["stitch_coverage"] = val["coverage"]
    boot = metrics.get("bootstrap", {})
    for key, entry in boot.get("summary", {}).items():
        summary[f"{key}_interval"] = entry["interval"]
        summary[f"{key}_se"] = entry["se"]
    cover = boot.get("coverage_vs_truth", {})
    if "never" in cover:
        summary["never_coverage_vs_truth"] = cover["never"]


def _rank_main(store_path, latent_dim, settings, outputs, truth, checkpoints) -> None:
    """One rank of a multi-process fit (started by :func:`poplds._distributed.launch`)."""
    init_from_environment(settings.device)
    fit_store(
        store_path, latent_dim, settings, outputs=outputs, truth=truth, checkpoints=checkpoints
    )


def _write_model(
    path: Path, fit: StitchedFit, store: DatasetStore, settings: dict, metrics: dict
) -> None:
    root, tmp = atomic_group(path)
    _write_checks(root, metrics)
    p = fit.params
    for name in ("A", "C", "Pi", "Q", "R", "X"):
        write_array(root, name, getattr(p, name))
    stages = {"free": 0, "linked": 1}
    trace = np.array([[stages[s], k, v] for s, k, v in fit.trace], dtype=np.float64)
    write_array(root, "loss_trace", trace.reshape(-1, 3))
    write_strings(root, "neuron_ids", store.neuron_ids)
    recs = root.create_group("recordings")
    for name in store.recording_names:
        g = recs.create_group(name)
        write_array(g, "mean", fit.means[name])
        write_array(g, "neurons", store.neurons(name))
    root.attrs.update(
        {
            "model": "stitched_lds",
            "settings": settings,
            "free": json_clean(fit.info.free.as_dict()),
            "linked": json_clean(fit.info.linked.as_dict()),
            "loss_trace_columns": ["stage (0 free, 1 linked)", "pass", "reduced loss per pair"],
            "dataset_store": str(store.path),
            "poplds_version": __version__,
        }
    )
    finish_group(tmp, path)


def _write_checks(root, metrics: dict[str, Any]) -> None:
    """``checks/``: A's eigenvalue moduli and time constants (s) with their intervals, rows
    (estimate, lo, hi) by modulus, and in its attributes every summary score with its
    interval and standard error, the stitch validation's and the bootstrap's settings."""
    boot, val = metrics.get("bootstrap", {}), metrics.get("stitch_validation", {})
    g = root.create_group("checks")
    for name in ("eigenvalue_modulus", "time_constant_s"):
        if name in boot:
            e = boot[name]
            write_array(g, name, np.array([e["value"], e["lo"], e["hi"]], dtype=np.float64))
    g.attrs.update(
        json_clean(
            {
                "rows": ["estimate", "lo", "hi"],
                "summary": metrics["summary"],
                "stitch_validation": {k: v for k, v in val.items() if k != "lags"},
                "bootstrap": {k: v for k, v in boot.items() if k not in ("scores", "summary")},
            }
        )
    )


def _write_latents(path: Path, fit: StitchedFit, posts) -> None:
    write_latents(
        path,
        "stitched_lds",
        {
            rec.name: (post.mean.cpu().numpy(), post.var.cpu().numpy())
            for rec, post in zip(fit.data.recordings, posts, strict=True)
        },
        __version__,
    )
