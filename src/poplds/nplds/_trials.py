"""The trials one Poisson LDS job fits: counts read and checked from the store, the seeded
split into training and held-out trials and neurons, and a simulation's truth in the store's
order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._errors import InputError
from .._logging import get_logger
from ..store import DatasetStore, damage_named
from .evaluate import split_neurons, split_trials
from .settings import NPLDSSettings

log = get_logger()


def counts_from_store(store: DatasetStore) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Spike counts (trials, time, neurons) float64, trial numbers, the neurons' positions in
    the store's neuron table, and the bin width in seconds, of the store's one recording."""
    names = store.recording_names
    if len(names) != 1:
        raise InputError(
            store.path,
            f"nplds fits one recording of trials; this dataset has {len(names)} ({names})",
        )
    name = names[0]
    arr = store.root[f"recordings/{name}/activity"]
    if arr.ndim != 3:
        raise InputError(
            store.path,
            f"recording {name} is {tuple(arr.shape)}, not (trials, time, neurons); "
            "set trials: true for this dataset",
        )
    attrs = store.recording_attrs(name)
    if attrs.get("kind") != "counts":
        raise InputError(store.path, f"recording {name} holds {attrs.get('kind')}, not counts")
    y = np.asarray(arr[...], dtype=np.float64)  # NaN: missing bins (skipped by the fit)
    seen = y[~np.isnan(y)]
    if np.any(np.isinf(seen)) or np.any(seen < 0) or np.any(seen != np.round(seen)):
        raise InputError(store.path, f"recording {name}: counts must be non-negative integers")
    if seen.size == 0:
        raise InputError(store.path, f"recording {name}: every bin is missing")
    if y.shape[0] < 3 or y.shape[1] < 2:
        raise InputError(store.path, f"recording {name}: need >= 3 trials of >= 2 bins")
    trial_ids = store.trial_ids(name)
    if trial_ids is None:
        trial_ids = np.arange(y.shape[0])
    return y, np.asarray(trial_ids), store.neurons(name), 1.0 / float(attrs["rate_hz"])


def load_truth(path: str | Path, neuron_ids: np.ndarray, trial_ids: np.ndarray) -> dict:
    """A simulation's ``truth.npz`` in the store's neuron and trial order: log-rate shift
    ``h C'`` (trials, N) and, when simulated, the per-trial dynamics ``A_trials``."""
    z = np.load(path)
    pos = {nid: k for k, nid in enumerate(z["neuron_ids"].tolist())}
    tpos = {int(t): k for k, t in enumerate(z["trial_ids"].tolist())}
    try:
        order = np.array([pos[n] for n in neuron_ids.tolist()])
        torder = np.array([tpos[int(t)] for t in trial_ids.tolist()])
    except KeyError as exc:
        raise InputError(path, f"{exc} of the store is not in the truth") from exc
    out = {"log_rate_shift": z["log_rate_shift"][np.ix_(torder, order)]}
    if "A_trials" in z.files:
        out["A_trials"] = z["A_trials"][torder]
    return out


def trial_inputs(store: DatasetStore, specs, n_bins: int, bin_s: float) -> np.ndarray | None:
    """Known inputs (trials, T, m) from the store's trials-table columns (``nplds.inputs``):
    ``{"column": c, "as": "event"}`` puts a 1 in the bin of each trial that contains the time
    ``c[r]`` (seconds on the file's clock; the trial's bins start at its window start), none
    where it is NaN or outside the bins; ``"as": "value"`` puts ``c[r]`` in every bin of trial
    r. None without inputs."""
    if not specs:
        return None
    name = store.recording_names[0]
    columns = store.trial_columns(name)
    starts = store.recording_attrs(name).get("trial_window_start_s")
    u = []
    for spec in specs:
        column, kind = spec["column"], spec.get("as", "event")
        if column not in columns:
            raise InputError(
                "nplds.inputs",
                f"column {column!r} is not a numeric column of the trials table of {store.path} "
                f"(it has {sorted(columns)})",
            )
        values = columns[column]
        if kind == "value":
            if np.any(np.isnan(values)):
                raise InputError("nplds.inputs", f"column {column!r} has NaN values")
            u.append(np.repeat(values[:, None], n_bins, 1))
            continue
        if starts is None:
            raise InputError(
                "nplds.inputs", f"{store.path} has no trial start times for event inputs"
            )
        onehot = np.zeros((len(values), n_bins))
        b = np.floor((values - np.asarray(starts)) / bin_s + 1e-9)
        ok = np.isfinite(b) & (b >= 0) & (b < n_bins)
        onehot[np.where(ok)[0], b[ok].astype(int)] = 1.0
        u.append(onehot)
    return np.stack(u, -1)


@dataclass
class Trials:
    """One fit_store run's data after its checks: counts ``y`` (trials, T, N) of the neurons
    with spikes in the training trials, their ``neurons`` (positions in the store's table),
    ``trial_ids`` (trials,) and ``n`` (trials,) float trial numbers (the GP's inputs), the
    bin width ``bin_s``, the ``train`` and ``test`` trials and ``heldout`` (trials,) bool,
    ``held`` (N,) bool the co-smoothing neurons, ``inverse`` (rows in [train, test] order to
    the store's), ``tt`` (to a float64 tensor on the device), ``warnings``, and the known
    inputs ``u`` (trials, T, m) or None."""

    y: np.ndarray
    neurons: np.ndarray
    trial_ids: np.ndarray
    n: np.ndarray
    bin_s: float
    train: np.ndarray
    test: np.ndarray
    heldout: np.ndarray
    held: np.ndarray
    inverse: np.ndarray
    tt: Any
    warnings: list[str]
    u: np.ndarray | None = None


def read_trials(store: DatasetStore, k: int, s: NPLDSSettings, dev) -> Trials:
    """Read and check the store's counts, split the trials and neurons (seeded), and leave
    out neurons without a spike in the training trials (they have no finite rate)."""
    with damage_named(store):
        y, trial_ids, neurons, bin_s = counts_from_store(store)
    R = y.shape[0]
    if k < 1:
        raise InputError("nplds.latent_dims", f"latent dimension {k} must be at least 1")
    out_mask = split_trials(R, s.heldout_trials, s.seed)
    train, test = np.where(~out_mask)[0], np.where(out_mask)[0]
    active = np.nansum(y[train], (0, 1)) > 0
    warnings = []
    if not active.all():
        silent = store.neuron_ids[neurons[~active]].tolist()
        warnings.append(
            f"{len(silent)} neurons without spikes in the training trials left out: {silent[:20]}"
        )
        log.warning(warnings[-1])
    if active.sum() < k:
        raise InputError(
            "nplds.latent_dims",
            f"k = {k} exceeds the {int(active.sum())} neurons with spikes in the training "
            f"trials of {store.path}; choose latent_dims of at most {int(active.sum())}",
        )
    y, neurons = y[..., active], neurons[active]
    held = split_neurons(y.shape[-1], s.heldout_neurons, s.seed)
    order = np.concatenate([train, test])
    return Trials(
        y=y,
        neurons=neurons,
        trial_ids=trial_ids,
        n=trial_ids.astype(np.float64),
        bin_s=bin_s,
        train=train,
        test=test,
        heldout=out_mask,
        held=held,
        inverse=np.argsort(order),
        tt=lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64, device=dev),
        warnings=warnings,
        u=trial_inputs(store, s.inputs, y.shape[1], bin_s),
    )
