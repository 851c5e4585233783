"""Results back into NWB: one file per fitted model and recording, for pynwb, pynapple, NWB
Widgets or a lab's own NWB code.

:func:`write_latents_nwb` writes ``<out>.nwb`` holding, in the processing module
``poplds_<model>`` (pynwb core types only; no extension is needed)::

    latent_mean      TimeSeries (time, n)  posterior means of the latents, on the recording's
                     own clock: rate and starting time of continuous data, or the timestamps of
                     each modelled bin of each trial (held-out trials, which have no latents,
                     and padded bins outside a trial are left out)
    latent_variance  TimeSeries (time, n)  their marginal posterior variances
    loadings         DynamicTable, one row per neuron of the recording: neuron_id, loading (n,),
                     and the model's per-neuron parameters (stitched LDS: noise_variance, mean;
                     Poisson models: log_rate_offset d)
    dynamics         DynamicTable, one row: the latent parameters (A, Q, and Pi or x0, V0, ...)
    source           DynamicTable, one row: the source file's path (relative to this file),
                     NWB identifier, sha256 and the series read, with the poplds version

Trial data also get the file's ``trials`` table: each trial's start time and the end of its
last bin with data (for whole trials the source's stop time, to within one bin),
its trial id in the source, whether it was held out, and (Poisson models with drift) the
posterior mean and variance of its slow modulator. The module's description holds the fit's
settings as JSON; the file's ``source_script`` and ``was_generated_by`` name the poplds version.
The identifier is derived from the source's sha256, the model and its settings, so the same
fit gives the same file. Written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from ._errors import InputError
from ._logging import get_logger
from ._outputs import MODELS, read_latents
from ._version import __version__
from .store import DatasetStore

log = get_logger()

#: session_start_time of files whose source has none (npz, suite2p): the Unix epoch.
NO_START_TIME = datetime(1970, 1, 1, tzinfo=UTC)


def _source_metadata(path: Path) -> dict[str, Any]:
    """Identifier, start time and description of an NWB source (``{}`` for other formats)."""
    if path.suffix.lower() != ".nwb" or not path.is_file():
        return {}
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(path), "r", load_namespaces=True) as io:
        f = io.read()
        out = {
            "identifier": str(f.identifier),
            "session_start_time": f.session_start_time,
            "session_description": str(f.session_description),
        }
        for key in ("subject_id", "species"):
            value = getattr(f.subject, key, None) if f.subject is not None else None
            if value:
                out[key] = str(value)
    return out


def _model_arrays(model_dir: Path, recording: str, store: DatasetStore) -> dict[str, Any]:
    """The fitted parameters of one model, restricted to one recording's neurons."""
    root = zarr.open_group(str(model_dir), mode="r")
    neurons = store.neurons(recording)
    arrays = {name: np.asarray(root[name][...]) for name in root.array_keys()}
    return {"attrs": dict(root.attrs), "neurons": neurons, **arrays}


def _on_the_clock(ds: DatasetStore, recording: str, mean: np.ndarray, var: np.ndarray):
    """The latents ``(mean, var)`` as ``(time, n)`` samples on the recording's own clock:
    ``(mean, var, timing, trials)`` with ``timing`` the TimeSeries' rate and starting time
    (continuous data) or timestamps (trial data), and for trial data ``trials`` (trials, 2)
    each trial's start and the end of its last bin with data (else None).

    Trial latents keep the bins of every modelled trial that lie inside the trial (where the
    store has data; the smoother's values elsewhere are extrapolations), in trial order, each
    bin at ``start[r] + b / rate``; trials without latents (held out) are left out."""
    rattrs = ds.recording_attrs(recording)
    rate = float(rattrs["rate_hz"])
    if mean.ndim == 2:
        return mean, var, {"rate": rate, "starting_time": float(rattrs.get("t_start_s", 0))}, None
    R, T = mean.shape[:2]
    starts = np.asarray(rattrs.get("trial_window_start_s", np.arange(R) * T / rate))
    inside = np.asarray(da.isfinite(ds.activity(recording)).any(axis=2).compute())
    bins = np.isfinite(mean[..., 0]) & inside
    t = starts[:, None] + np.arange(T)[None, :] / rate
    # each trial from its start to the end of its last bin with data (whole trials: the
    # source's stop time, to within one bin; a window: the window or the trial's end)
    last = np.where(inside.any(axis=1), T - np.argmax(inside[:, ::-1], 1), 0)
    trials = np.stack([starts, starts + last / rate], axis=1)
    return mean[bins], var[bins], {"timestamps": t[bins]}, trials


def _table(name: str, description: str, columns: dict[str, tuple[str, Any]]):
    """A DynamicTable from ``{column: (description, data)}``."""
    from hdmf.common import DynamicTable, VectorData

    return DynamicTable(
        name=name,
        description=description,
        columns=[VectorData(name=k, description=d, data=v) for k, (d, v) in columns.items()],
    )


def _check_tables(model_dir: Path) -> list:
    """The stitched fit's checks (``model.zarr/checks``) as tables: ``scores`` (each summary
    score with its bootstrap interval and standard error) and ``time_constants`` (A's
    eigenvalue moduli and time constants with their intervals); none without checks."""
    root = zarr.open_group(str(model_dir), mode="r")
    if "checks" not in root:
        return []
    g = root["checks"]
    summary = dict(g.attrs).get("summary", {})
    names = [k for k, v in summary.items() if isinstance(v, int | float) and not k.endswith("_se")]
    nan = float("nan")

    def bound(k: str, i: int) -> float:
        ci = summary.get(f"{k}_interval")
        return float(ci[i]) if ci else nan

    tables = [
        _table(
            "scores",
            "the fit's summary scores (metrics.json) with their bootstrap intervals",
            {
                "score": ("name of the score in metrics.json", names),
                "value": ("estimate", [float(summary[k]) for k in names]),
                "lo": ("lower end of the interval (NaN: none)", [bound(k, 0) for k in names]),
                "hi": ("upper end of the interval (NaN: none)", [bound(k, 1) for k in names]),
                "se": (
                    "bootstrap standard error (NaN: none)",
                    [float(summary.get(f"{k}_se") or nan) for k in names],
                ),
            },
        )
    ]
    if "time_constant_s" in g:
        tau, mod = np.asarray(g["time_constant_s"][:]), np.asarray(g["eigenvalue_modulus"][:])
        tables.append(
            _table(
                "time_constants",
                "eigenvalues of A by modulus: moduli and time constants -1/(rate ln|l|) in "
                "seconds, with their bootstrap intervals",
                {
                    "modulus": ("|eigenvalue|", mod[0]),
                    "modulus_lo": ("interval, lower end", mod[1]),
                    "modulus_hi": ("interval, upper end", mod[2]),
                    "time_constant_s": ("time constant (s)", tau[0]),
                    "time_constant_lo_s": ("interval, lower end (s)", tau[1]),
                    "time_constant_hi_s": ("interval, upper end (s)", tau[2]),
                },
            )
        )
    return tables


def _nwb_file(model: str, recording: str, n: int, rel: str, meta: dict, rattrs: dict, settings):
    """The NWBFile: its identifier derived from the source's sha256, the model, the recording
    and the settings (the same fit gives the same file), the source's start time and
    subject."""
    from pynwb import NWBFile

    key = json.dumps([rattrs["sha256"], model, recording, settings], sort_keys=True, default=str)
    nwb = NWBFile(
        session_description=f"poplds {model} latents (n = {n}) of recording {recording}"
        + (f"; source: {meta['session_description']}" if meta.get("session_description") else ""),
        identifier=str(uuid.uuid5(uuid.NAMESPACE_URL, "poplds:" + key)),
        session_start_time=meta.get("session_start_time", NO_START_TIME),
        source_script=f"poplds {__version__}",
        source_script_file_name="poplds",
        was_generated_by=[["poplds", __version__]],
        notes=json.dumps(
            {
                "source": rel,
                "source_identifier": meta.get("identifier"),
                "source_sha256": rattrs["sha256"],
            }
        ),
    )
    if "subject_id" in meta or "species" in meta:
        from pynwb.file import Subject

        nwb.subject = Subject(subject_id=meta.get("subject_id"), species=meta.get("species"))
    return nwb


def write_latents_nwb(
    store: str | Path,
    recording: str,
    model: str,
    model_dir: str | Path,
    latents: str | Path,
    out: str | Path,
) -> Path:
    """Write one recording's latents and the model's parameters as an NWB file.

    Parameters
    ----------
    store: the dataset store the model was fitted on (``data.zarr``).
    recording: the recording's name in the store.
    model: a name of :data:`poplds._outputs.MODELS` (``stitched_lds``, ``nplds``, ``plds``,
        ``nplds_dynamics``); its description says which parameters go where.
    model_dir: the fit's ``model.zarr``.
    latents: the fit's ``latents.zarr`` (:mod:`poplds._outputs`).
    out: the ``.nwb`` file to write.

    Latent means ``m[t]`` and marginal variances ``diag S[t]`` are ``(time, n)`` on the
    recording's clock (:func:`_on_the_clock`).

    Raises
    ------
    InputError: the recording is not in the store, or the model is unknown.

    Long by choice: it lays out one NWB file top to bottom (file, module, series, tables,
    trials) from :data:`poplds._outputs.MODELS`; each part is built by a helper.
    """
    from pynwb import TimeSeries

    out = Path(out)
    if model not in MODELS:
        raise InputError(Path(model_dir), f"unknown model {model!r} (known: {list(MODELS)})")
    desc = MODELS[model]
    ds = DatasetStore(store)
    if recording not in ds.recording_names:
        raise InputError(ds.path, f"no recording {recording!r} (has {ds.recording_names})")
    rattrs = ds.recording_attrs(recording)
    source = Path(rattrs["source"])
    meta = _source_metadata(source)
    p = _model_arrays(Path(model_dir), recording, ds)
    lat_mean, lat_var = read_latents(latents, recording)
    mean, var, timing, trials = _on_the_clock(ds, recording, lat_mean, lat_var)
    n = mean.shape[1]
    # relative as the user laid the folders out (symlinks kept: a data/ link stays data/)
    rel = os.path.relpath(os.path.abspath(source), os.path.abspath(out.parent))
    settings = p["attrs"].get("settings", {})
    nwb = _nwb_file(model, recording, n, rel, meta, rattrs, settings)
    module = nwb.create_processing_module(
        name=f"poplds_{model}",
        description=json.dumps(
            {"model": model, "latent_dim": n, "settings": settings, "poplds_version": __version__},
            default=str,
        ),
    )
    for name, data, unit, what in (
        ("latent_mean", mean, "a.u.", f"posterior means of the {n} latents, (time, n)"),
        (
            "latent_variance",
            var,
            "a.u.^2",
            "marginal posterior variances of the latents, (time, n)",
        ),
    ):
        module.add(
            TimeSeries(
                name=name, data=data.astype(np.float32), unit=unit, description=what, **timing
            )
        )
    rows = p["neurons"]
    neuron_columns = {
        "neuron_id": ("the neuron's id in the source", ds.neuron_ids[rows]),
        "loading": ("row of C: the neuron's loading (n,)", p["C"][rows]),
        **{c.name: (c.description, p[c.array][rows]) for c in desc.per_neuron},
    }
    dynamics = {k: (f"{k} of the fitted model", p[k][None]) for k in desc.dynamics if k in p}
    source_row = {
        "path": rel,
        "identifier": meta.get("identifier") or "",
        "sha256": rattrs["sha256"],
        "series": str(rattrs.get("series", "")),
        "recording": recording,
        "poplds_version": __version__,
    }
    for table in (
        _table(
            "loadings",
            "per-neuron parameters of the model, for this recording's neurons",
            neuron_columns,
        ),
        _table("dynamics", "latent parameters of the model (one row)", dynamics),
        _table(
            "source",
            "the recording these latents were fitted on",
            {k: (k, [v]) for k, v in source_row.items()},
        ),
    ):
        module.add(table)
    for table in _check_tables(Path(model_dir)):
        module.add(table)
    if trials is not None:
        _add_trials(nwb, trials, ds.trial_ids(recording), lat_mean, desc, p)
    _write_nwb(nwb, out)
    log.info("wrote %s: %s latents (%d x %d) of %s", out, model, *mean.shape, recording)
    return out


def _add_trials(nwb, trials: np.ndarray, trial_ids, lat_mean: np.ndarray, desc, p) -> None:
    """The file's trials table: each trial's start and end (:func:`_on_the_clock`), its id in
    the source, whether it was held out (no latents), and the model's per-trial columns."""
    if trial_ids is None:
        trial_ids = np.arange(len(trials))
    heldout = ~np.isfinite(lat_mean[..., 0]).any(axis=1)
    nwb.add_trial_column("source_trial_id", "the trial's id in the source's trials table")
    nwb.add_trial_column("heldout", "left out of the fit (scored, no latents here)")
    for c in desc.per_trial:
        nwb.add_trial_column(c.name, c.description)
    for r, (t0, t1) in enumerate(trials):
        nwb.add_trial(
            start_time=float(t0),
            stop_time=float(t1),
            source_trial_id=int(trial_ids[r]),
            heldout=bool(heldout[r]),
            **{c.name: p[c.array][r] for c in desc.per_trial},
        )


def _write_nwb(nwb, out: Path) -> None:
    """Write ``nwb`` to ``out`` under a temporary name, then rename."""
    from pynwb import NWBHDF5IO

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".partial.nwb")
    try:
        with NWBHDF5IO(str(tmp), "w") as io:
            io.write(nwb)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)


def read_latents_nwb(path: str | Path, model: str) -> Mapping[str, np.ndarray]:
    """Read back what :func:`write_latents_nwb` wrote (with pynwb): ``mean``, ``variance``
    (time, n), ``timestamps`` (time,) and ``loading`` (neurons, n)."""
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(path), "r") as io:
        f = io.read()
        module = f.processing[f"poplds_{model}"]
        ts = module["latent_mean"]
        return {
            "mean": np.asarray(ts.data[:]),
            "variance": np.asarray(module["latent_variance"].data[:]),
            "timestamps": np.asarray(ts.get_timestamps()),
            "loading": np.asarray(module["loadings"]["loading"][:]),
        }
