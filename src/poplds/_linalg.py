"""Small matrix helpers shared by both model families (numpy arrays and torch tensors alike).

- :func:`sym`: the symmetric part ``(M + M') / 2`` over the last two axes;
- :func:`psd_project`: the nearest symmetric matrix with eigenvalues at least a floor;
- :func:`stabilise`: eigenvalues of a dynamics matrix scaled back inside a radius.

Each guard counts, when given a ``Counter``, how often it changed its input: a fit reports
those counts in ``metrics.json`` (``guards``).
"""

from __future__ import annotations

from collections import Counter
from typing import TypeVar

import numpy as np
import torch

Matrix = TypeVar("Matrix", np.ndarray, torch.Tensor)


def sym(M: Matrix) -> Matrix:
    """``(M + M') / 2`` over the last two axes, for batches of numpy arrays or torch tensors."""
    return 0.5 * (M + M.swapaxes(-1, -2))


def psd_project(
    M: Matrix, floor: float = 0.0, *, relative: bool = False, guards: Counter | None = None
) -> Matrix:
    """Nearest symmetric matrix with eigenvalues >= ``floor`` (Frobenius norm):
    ``V max(w, floor) V'`` with ``w, V`` the eigen-decomposition of :func:`sym` (M). With
    ``relative`` the floor is ``floor * max(w_max, 1e-12)``. (n, n) -> (n, n). With
    ``guards``, the eigenvalues raised to the floor are added to ``guards["psd_floor"]``."""
    if isinstance(M, torch.Tensor):
        w, V = torch.linalg.eigh(sym(M))
        lo = floor * w.max().clamp(min=1e-12) if relative else floor
        if guards is not None:
            guards["psd_floor"] += int((w < lo).sum())
        return (V * torch.clamp(w, min=lo)) @ V.T
    w, V = np.linalg.eigh(sym(M))
    lo = floor * max(float(w.max()), 1e-12) if relative else floor
    if guards is not None:
        guards["psd_floor"] += int((w < lo).sum())
    return (V * np.maximum(w, lo)) @ V.T


def stabilise(
    A: np.ndarray, max_radius: float = 0.995, guards: Counter | None = None
) -> np.ndarray:
    """Scale eigenvalues of modulus above ``max_radius`` back to it (a real matrix stays
    real: conjugate pairs are scaled alike). (n, n) -> (n, n). With ``guards``, the
    eigenvalues scaled are added to ``guards["stable_cap"]``."""
    lam, V = np.linalg.eig(A)
    if guards is not None:
        guards["stable_cap"] += int((np.abs(lam) > max_radius).sum())
    if np.all(np.abs(lam) <= max_radius):
        return A
    lam = np.where(np.abs(lam) > max_radius, lam * max_radius / np.abs(lam), lam)
    return np.real(V @ np.diag(lam) @ np.linalg.inv(V))
