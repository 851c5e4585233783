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


def write_latents_nwb(
    store: str | Path,
    recording: str,
    model: str,
    model_dir: str | Path,
    out: str | Path,
    *,
    latents: str | Path | None = None,
) -> Path:
    """Write one recording's latents and the model's parameters as an NWB file.

    Parameters
    ----------
    store: the dataset store the model was fitted on (``data.zarr``).
    recording: the recording's name in the store.
    model: ``stitched_lds``, ``nplds``, ``plds`` or ``nplds_dynamics``.
    model_dir: the fit's ``model.zarr``.
    out: the ``.nwb`` file to write.
    latents: stitched LDS only: the fit's ``latents.zarr`` (means and variances, (T_r, n)).

    Latent means ``m[t]`` and marginal variances ``diag S[t]`` are ``(time, n)``; for trial data
    the bins of every training trial that lie inside the trial (where the store has data) are
    concatenated in trial order, each bin at ``start[r] + b / rate`` on the source's clock.

    Raises
    ------
    InputError: the recording is not in the store, or the model's results are missing.
    """
    from hdmf.common import DynamicTable, VectorData
    from pynwb import NWBHDF5IO, NWBFile, TimeSeries

    out = Path(out)
    ds = DatasetStore(store)
    if recording not in ds.recording_names:
        raise InputError(ds.path, f"no recording {recording!r} (has {ds.recording_names})")
    rattrs = ds.recording_attrs(recording)
    source = Path(rattrs["source"])
    meta = _source_metadata(source)
    p = _model_arrays(Path(model_dir), recording, ds)
    settings = p["attrs"].get("settings", {})
    rate = float(rattrs["rate_hz"])
    ids = ds.neuron_ids[p["neurons"]]

    if model == "stitched_lds":
        if latents is None:
            raise InputError(Path(model_dir), "the stitched LDS's latents.zarr is needed")
        lat = zarr.open_group(str(latents), mode="r")[f"recordings/{recording}"]
        mean, var = np.asarray(lat["mean"][...]), np.asarray(lat["var"][...])
        timing: dict[str, Any] = {"rate": rate, "starting_time": float(rattrs.get("t_start_s", 0))}
        trial_rows = None
    else:
        x_mean, x_var = p["x_mean"], p["x_var"]  # (trials, T, k), NaN on held-out trials
        starts = np.asarray(
            rattrs.get("trial_window_start_s", np.arange(x_mean.shape[0]) * x_mean.shape[1] / rate)
        )
        # the bins of each training trial that lie inside the trial (the store's activity is
        # missing outside it, where the smoother's latents are extrapolations)
        inside = np.asarray(da.isfinite(ds.activity(recording)).any(axis=2).compute())
        modelled = ~p["heldout"]
        bins = np.isfinite(x_mean[..., 0]) & inside & modelled[:, None]
        t = starts[:, None] + np.arange(x_mean.shape[1])[None, :] / rate
        mean, var = x_mean[bins], x_var[bins]
        timing = {"timestamps": t[bins]}
        # each trial from its start to the end of its last bin with data (whole trials: the
        # source's stop time, to within one bin; a window: the window or the trial's end)
        last = np.where(inside.any(axis=1), x_mean.shape[1] - np.argmax(inside[:, ::-1], 1), 0)
        trial_rows = np.stack([starts, starts + last / rate], axis=1)
    n = mean.shape[1]

    start_time = meta.get("session_start_time", NO_START_TIME)
    # relative as the user laid the folders out (symlinks kept: a data/ link stays data/)
    rel = os.path.relpath(os.path.abspath(source), os.path.abspath(out.parent))
    key = json.dumps([rattrs["sha256"], model, recording, settings], sort_keys=True, default=str)
    nwb = NWBFile(
        session_description=f"poplds {model} latents (n = {n}) of recording {recording}"
        + (f"; source: {meta['session_description']}" if meta.get("session_description") else ""),
        identifier=str(uuid.uuid5(uuid.NAMESPACE_URL, "poplds:" + key)),
        session_start_time=start_time,
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
    module = nwb.create_processing_module(
        name=f"poplds_{model}",
        description=json.dumps(
            {"model": model, "latent_dim": n, "settings": settings, "poplds_version": __version__},
            default=str,
        ),
    )
    module.add(
        TimeSeries(
            name="latent_mean",
            data=mean.astype(np.float32),
            unit="a.u.",
            description=f"posterior means of the {n} latents, (time, n)",
            **timing,
        )
    )
    module.add(
        TimeSeries(
            name="latent_variance",
            data=var.astype(np.float32),
            unit="a.u.^2",
            description="marginal posterior variances of the latents, (time, n)",
            **timing,
        )
    )
    C = p["C"][p["neurons"]]
    columns = [
        VectorData(name="neuron_id", description="the neuron's id in the source", data=ids),
        VectorData(name="loading", description="row of C: the neuron's loading (n,)", data=C),
    ]
    if model == "stitched_lds":
        columns += [
            VectorData(
                name="noise_variance",
                description="R: private noise variance, in the squared units of the activity",
                data=p["R"][p["neurons"]],
            ),
        ]
        names = ("A", "Q", "Pi")
    else:
        columns.append(
            VectorData(
                name="log_rate_offset",
                description="d: log firing rate offset, rate = exp(C x + d + modulator) / bin",
                data=p["d"][p["neurons"]],
            )
        )
        names = ("A", "Q", "x0", "V0", "sigma2", "tau") + (("A1", "tau_g") if "A1" in p else ())
    module.add(
        DynamicTable(
            name="loadings",
            description="per-neuron parameters of the model, for this recording's neurons",
            columns=columns,
        )
    )
    module.add(
        DynamicTable(
            name="dynamics",
            description="latent parameters of the model (one row)",
            columns=[
                VectorData(name=k, description=f"{k} of the fitted model", data=p[k][None])
                for k in names
                if k in p
            ],
        )
    )
    module.add(
        DynamicTable(
            name="source",
            description="the recording these latents were fitted on",
            columns=[
                VectorData(name=k, description=k, data=[v])
                for k, v in {
                    "path": rel,
                    "identifier": meta.get("identifier") or "",
                    "sha256": rattrs["sha256"],
                    "series": str(rattrs.get("series", "")),
                    "recording": recording,
                    "poplds_version": __version__,
                }.items()
            ],
        )
    )
    if trial_rows is not None:
        nwb.add_trial_column("source_trial_id", "the trial's id in the source's trials table")
        nwb.add_trial_column("heldout", "left out of the fit (scored, no latents here)")
        extra = {}
        if model != "plds":
            nwb.add_trial_column("modulator_mean", "posterior mean of the slow modulator h (k,)")
            nwb.add_trial_column("modulator_var", "posterior variance of h (k,)")
        for r, (t0, t1) in enumerate(trial_rows):
            if model != "plds":
                extra = {"modulator_mean": p["h_mean"][r], "modulator_var": p["h_var"][r]}
            nwb.add_trial(
                start_time=float(t0),
                stop_time=float(t1),
                source_trial_id=int(p["trial_ids"][r]),
                heldout=bool(p["heldout"][r]),
                **extra,
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".partial.nwb")
    try:
        with NWBHDF5IO(str(tmp), "w") as io:
            io.write(nwb)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    log.info("wrote %s: %s latents (%d x %d) of %s", out, model, *mean.shape, recording)
    return out


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
