"""The registry of stage optimisers, with the built-in ones in it, and ``optimizer: auto``.

Each built-in optimiser registers itself in its own module (``_lbfgs``, ``_sgd``,
``_subspace``); :func:`registry` imports them and gives every registered optimiser in order
of preference. ``auto`` takes the one of least modelled cost: the reads of the data a fit
is expected to take times the flops of a pass, plus what the optimiser adds per pass.
"""

from __future__ import annotations

from .._errors import InputError
from . import _lbfgs, _sgd, _subspace  # noqa: F401 - each registers itself
from ._loss import DataTerm
from ._stage import REGISTRY, OptimizerSpec, register

__all__ = ["BUILTIN", "choose_optimizer", "optimizer_costs", "register", "registry"]

#: The built-in optimisers, each registered by its own module, first in this order.
BUILTIN = ("lbfgs", "sgd", "subspace")


def registry() -> dict[str, OptimizerSpec]:
    """Every registered optimiser by name, in order of preference on a tie of modelled cost:
    the :data:`BUILTIN` ones, then the others as registered."""
    order = [*BUILTIN, *(k for k in REGISTRY if k not in BUILTIN)]
    return {k: REGISTRY[k] for k in order}


#: Flops one byte read from a store costs, in time, against a large matrix product: on the
#: 2 cores measured, zarr decodes 0.3-0.7 GB/s where float32 products run at about 25 GFlop/s.
READ_FLOPS_PER_BYTE = 40.0


def pass_flops(term: DataTerm) -> float:
    """Modelled flops of one pass over the data route: ``4 T_r N_r n`` products per
    recording, plus ``READ_FLOPS_PER_BYTE`` per byte of a streamed recording (float32 in the
    store). Recordings on the moments route read nothing and count for none."""
    n, total = term.n_latent, 0.0
    for rec, how in zip(term.data.recordings, term.routes, strict=True):
        if how == "data":
            T, N = rec.n_time, len(rec.neurons)
            total += 4.0 * T * N * n
            if rec.data is None:
                total += READ_FLOPS_PER_BYTE * T * N * 4
    return total


def optimizer_costs(term: DataTerm) -> dict[str, float]:
    """Modelled flops of a fit by each optimiser that ``auto`` may pick: its expected reads
    of the data times the flops of a pass (:func:`pass_flops`) and of what it adds per pass
    without reading."""
    per_pass = pass_flops(term)
    out = {}
    for name, spec in registry().items():
        if spec.expected_reads is None:
            continue
        extra = spec.extra_flops(term) if spec.extra_flops is not None else 0.0
        out[name] = spec.expected_reads * (per_pass + extra)
    return out


def choose_optimizer(term: DataTerm, optimizer: str) -> OptimizerSpec:
    """The registered optimiser ``optimizer``, or for ``auto`` the one of least modelled cost
    (:func:`optimizer_costs`) among those eligible for this data term, the first registered
    on a tie (L-BFGS, when no recording is on the data route and a pass costs nothing)."""
    specs = registry()
    if optimizer != "auto":
        if optimizer not in specs:
            raise InputError(
                "stitched_lds.optimizer",
                f"must be auto or one of {', '.join(specs)}, got {optimizer!r}",
            )
        return specs[optimizer]
    costs = {
        name: cost
        for name, cost in optimizer_costs(term).items()
        if specs[name].eligible is None or specs[name].eligible(term)
    }
    order = list(specs)
    return specs[min(costs, key=lambda k: (costs[k], order.index(k)))]
