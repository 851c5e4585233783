"""What every fitted model writes, described once: the latents layout both families share, and
per model the parameters that the NWB export and the report read (no reader branches on a
model's name). Only the standard library at import: the Snakefile reads the model list too.

Latents (``latents.zarr`` beside each fit's ``model.zarr``), one layout for every model::

    latents.zarr/
      recordings/<name>/mean   float32, the recording's leading axes + (n,): (time, n) for a
                               continuous recording, (trials, time, n) for trial data; NaN
                               where the model has no latents (held-out trials)
      recordings/<name>/var    float32, the same shape: marginal posterior variances
      attrs: model, latent_dim, poplds_version

A model's ``model.zarr`` holds ``C`` (N_total, n) and its other parameters (each family's
``run`` module documents them); :data:`MODELS` says which of them are per neuron, which
describe the latent dynamics and which are per trial.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and zarr are imported where used: the Snakefile imports this module
    import numpy as np


@dataclass(frozen=True)
class Column:
    """One array of a model.zarr as a column of a table: ``array`` its name in model.zarr,
    ``name`` the column's, ``description`` a sentence."""

    array: str
    name: str
    description: str


@dataclass(frozen=True)
class ModelDescription:
    """One model: ``name`` (its results folder and NWB processing module, ``poplds_<name>``);
    ``family`` (the ``models:`` entry of the configuration that fits it); ``per_neuron``:
    columns besides the loadings ``C``, one row per neuron; ``dynamics``: arrays describing the
    latent dynamics (those present are written); ``per_trial``: columns of the trials table;
    ``drift``, ``dynamics_drift``: the Poisson models' drift of rates and of dynamics;
    ``label``: the name figures and tables show."""

    name: str
    family: str
    per_neuron: tuple[Column, ...]
    dynamics: tuple[str, ...]
    per_trial: tuple[Column, ...] = ()
    drift: bool = False
    dynamics_drift: bool = False
    label: str = ""


_D = Column(
    "d", "log_rate_offset", "d: log firing rate offset, rate = exp(C x + d + modulator) / bin"
)
_MODULATOR = (
    Column("h_mean", "modulator_mean", "posterior mean of the slow modulator h (k,)"),
    Column("h_var", "modulator_var", "posterior variance of h (k,)"),
)
_POISSON_DYNAMICS = ("A", "Q", "x0", "V0", "sigma2", "tau")

#: Every model poplds fits, by name; the Poisson models in the order they are fitted (PLDS
#: first: a drift fit that ends below its bound is fitted again from it).
MODELS: dict[str, ModelDescription] = {
    m.name: m
    for m in (
        ModelDescription(
            "stitched_lds",
            "stitched_lds",
            (
                Column(
                    "R",
                    "noise_variance",
                    "R: private noise variance, in the squared units of the activity",
                ),
            ),
            ("A", "Q", "Pi"),
            label="stitched LDS",
        ),
        ModelDescription("plds", "nplds", (_D,), _POISSON_DYNAMICS, label="PLDS"),
        ModelDescription(
            "nplds", "nplds", (_D,), _POISSON_DYNAMICS, _MODULATOR, drift=True, label="N-PLDS"
        ),
        ModelDescription(
            "nplds_dynamics",
            "nplds",
            (_D,),
            (*_POISSON_DYNAMICS, "A1", "tau_g"),
            _MODULATOR,
            drift=True,
            dynamics_drift=True,
            label="N-PLDS, drifting A",
        ),
    )
}


#: The model families, as the configuration's ``models:`` names them.
FAMILIES = tuple(dict.fromkeys(m.family for m in MODELS.values()))


def poisson_models(dynamics_drift: bool) -> tuple[str, ...]:
    """The Poisson models one ``nplds`` job fits, in order (the variant with drifting
    dynamics only when asked)."""
    return tuple(
        m.name
        for m in MODELS.values()
        if m.family == "nplds" and (dynamics_drift or not m.dynamics_drift)
    )


def write_latents(
    path: str | Path,
    model: str,
    latents: Mapping[str, tuple[np.ndarray, np.ndarray]],
    version: str,
) -> None:
    """Write ``latents.zarr`` (module docstring) at ``path``: per recording name, its
    ``(mean, var)``; under a temporary name, then renamed."""
    import numpy as np

    from ._results import atomic_group, finish_group
    from .store import write_array

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root, tmp = atomic_group(path)
    recs = root.create_group("recordings")
    n = 0
    for name, (mean, var) in latents.items():
        g = recs.create_group(name)
        write_array(g, "mean", np.asarray(mean, dtype=np.float32))
        write_array(g, "var", np.asarray(var, dtype=np.float32))
        n = int(np.shape(mean)[-1])
    root.attrs.update({"model": model, "latent_dim": n, "poplds_version": version})
    finish_group(tmp, path)


def read_latents(path: str | Path, recording: str) -> tuple[np.ndarray, np.ndarray]:
    """One recording's ``(mean, var)`` from a ``latents.zarr`` (module docstring)."""
    import numpy as np
    import zarr

    group = zarr.open_group(str(path), mode="r")[f"recordings/{recording}"]
    return np.asarray(group["mean"][...]), np.asarray(group["var"][...])
