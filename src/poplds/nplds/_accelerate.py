"""SQUAREM acceleration of variational EM with a bound check (Varadhan & Roland 2008).

EM for the Poisson LDS moves slowly along ridges of its bound (on real data, thousands of
iterations with increments of 1e-3 nats). SQUAREM extrapolates two EM steps:

    t1 = F(t0),  t2 = F(t1),  r = t1 - t0,  v = t2 - t1 - r,  a = -|r| / |v|  (a <= -1)
    t' = t0 - 2 a r + a^2 v,  then one more EM step from t'

and keeps the result only when its bound is at least that of ``t2`` (else ``t2``; ``a = -1``
gives ``t' = t2``), so the bound still never falls. ``t`` holds every parameter and every
variational quantity in a coordinate where a straight line stays valid: covariance parameters
``Q``, ``V0``, ``q(h)``'s, ``q(g)``'s, ``q(f)``'s and ``q(e)``'s covariances directly
(symmetrised; a candidate that is not positive definite is rejected), site precisions ``w``
as logarithms, the rest as they are.
The paths' covariances are recomputed from ``w`` and the new parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields, replace

import torch

from .._linalg import sym

#: Fields of the parameters and of q that are extrapolated (the rest is derived).
PARAM_FIELDS = (
    *("C", "d", "A", "Q", "x0", "V0", "B", "log_sigma2", "log_tau", "A1", "log_tau_g"),
    *("f_mean", "f_cov", "log_sf2", "log_lf", "log_se2", "log_le"),
)
STATE_FIELDS = ("m", "w", "hm", "hS", "gm", "gS", "em", "eS")
#: Symmetric positive definite fields, checked after extrapolation.
SPD_FIELDS = ("Q", "V0", "hS", "gS", "f_cov", "eS")


def _coords(p, st) -> dict[str, torch.Tensor]:
    out = {f: getattr(p, f) for f in PARAM_FIELDS if getattr(p, f) is not None}
    for f in STATE_FIELDS:
        v = getattr(st, f)
        if f in ("hm", "hS") and p.log_sigma2 is None:  # h = 0 in the stationary model
            continue
        if v is not None:
            out["st." + f] = torch.log(v.clamp(min=1e-300)) if f == "w" else v
    return out


def extrapolate(p0, st0, p1, st1, p2, st2, rebuild: Callable) -> tuple[object, object, float]:
    """The SQUAREM point ``t'`` from three EM iterates (module docstring) and its step ``a``,
    or ``(None, None, a)`` when a covariance would not be positive definite.

    ``rebuild(p, st)`` recomputes the paths' covariances (S, cross, log det) of ``st`` from its
    site precisions ``w`` under parameters ``p``.
    """
    c0, c1, c2 = _coords(p0, st0), _coords(p1, st1), _coords(p2, st2)
    r = {k: c1[k] - c0[k] for k in c0}
    v = {k: c2[k] - c1[k] - r[k] for k in c0}
    rn = math.sqrt(sum(float((x * x).sum()) for x in r.values()))
    vn = math.sqrt(sum(float((x * x).sum()) for x in v.values()))
    if vn == 0 or not math.isfinite(rn / vn):
        return None, None, -1.0
    a = min(-1.0, -rn / vn)
    new = {k: c0[k] - 2 * a * r[k] + a * a * v[k] for k in c0}
    for k in list(new):
        name = k.removeprefix("st.")
        if name in SPD_FIELDS:
            new[k] = sym(new[k])
            try:
                torch.linalg.cholesky(new[k])
            except torch.linalg.LinAlgError:
                return None, None, a
    pn = replace(p2, **{k: new[k] for k in new if not k.startswith("st.")})
    changes = {k[3:]: new[k] for k in new if k.startswith("st.")}
    changes["w"] = torch.exp(changes["w"]) * (st2.w > 0)
    sn = replace(st2, **changes)
    try:
        sn = rebuild(pn, sn)
    except torch.linalg.LinAlgError:
        return None, None, a
    if not all(
        torch.isfinite(getattr(sn, f.name)).all()
        for f in fields(sn)
        if isinstance(getattr(sn, f.name), torch.Tensor)
    ):
        return None, None, a
    return pn, sn, a
