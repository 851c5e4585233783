"""The deterministic warm start of a stitched fit (``models``, step 1).

PCA of the largest recording (a randomized range finder on its covariance, or subspace
iteration on its lagged moments) gives its loadings and ``X_s`` from the lagged covariances
of its projections. Each further recording, in breadth-first order over the overlap graph,
gets the loadings of its new neurons ``u`` by least squares against the neurons ``k``
already placed:

    C_u sum_s (X_s G_k X_s' + X_s' G_k X_s) = sum_s (F_s X_s' + B_s X_s)

with ``G_k = C_k' C_k``, ``F_s = sum_t y_u[t+s] z_k[t]' / (T-s)`` and
``B_s = sum_t y_u[t] z_k[t+s]' / (T-s)``. Held-out pairs take no part in it.
"""

from __future__ import annotations

import numpy as np
import torch

from .._errors import InputError
from .._linalg import sym
from ._data import StitchedData
from ._loss import DataTerm


def _allowed(data: StitchedData, rec) -> torch.Tensor:
    """(G_r, G_r) float64 on the device: 1 where a pair of the recording's groups is in the
    fit, 0 where it is held out. The warm start sees only the pairs the loss sees, so
    held-out scores stay honest however early a fit stops."""
    g = np.asarray(rec.groups)
    ok = ~data.heldout[np.ix_(g, g)]
    return torch.as_tensor(ok.astype(np.float64), device=data.device)


def _group_products(rec, y: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``y_g V_g`` for every group g of the recording: (rows, G_r, p)."""
    return torch.stack([y[:, sl] @ V[sl] for sl in rec.slices], dim=1)


def _top_subspace(
    data: StitchedData,
    rec_index: int,
    n: int,
    seed: int,
    moments: torch.Tensor | None = None,
    iters: int | None = None,
):
    """Top-n eigenvectors ``V`` (N_r, n) and eigenvalues of recording ``rec_index``'s
    covariance, with the held-out pairs' entries set to zero, in its column order, and from
    the data also the recording's projections ``z[t, g] = V_g' y_g[t]`` (T_r, G_r, n)
    float64, formed in the last pass (None from moments).

    From the data: a randomized range finder with one power iteration (two passes: the range
    of ``Cov Omega`` for a Gaussian ``Omega`` of n + 8 columns, then Rayleigh-Ritz on it),
    enough when the top n eigenvalues stand out of the noise, which is when a fit is worth
    starting. From the recording's lagged ``moments`` (no data read): 20 subspace iterations
    of the dense matrix. ``iters`` overrides the number of iterations."""
    rec = data.recordings[rec_index]
    dev = data.device
    n_r = len(rec.neurons)
    p = min(n_r, n + 8)
    g = torch.Generator(device="cpu").manual_seed(seed)
    V = torch.randn((n_r, p), generator=g, dtype=torch.float64).to(dev)
    keep = None
    if moments is not None:
        iters, cov = iters or 20, moments[0]

        def apply(V: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
            return cov @ V
    else:
        iters = iters or 1
        allowed = _allowed(data, rec).to(rec.dtype)
        keep = torch.empty((rec.n_time, len(rec.slices), p), dtype=torch.float64, device=dev)

        def apply(V: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
            W = torch.zeros_like(V)
            V32 = V.to(rec.dtype)
            for t0, y in rec.chunks(dev):
                raw = _group_products(rec, y, V32)
                if keep is not None:
                    keep[t0 : t0 + y.shape[0]] = raw
                Zg = torch.einsum("gh,thp->tgp", allowed, raw)
                for k, sl in enumerate(rec.slices):
                    W[sl] += (y[:, sl].T @ Zg[:, k]).to(torch.float64)
            return W

    for it in range(iters + 1):
        W = apply(V, keep if it == iters else None)
        if it < iters:
            V, _ = torch.linalg.qr(W / rec.n_time)
    small = V.T @ W / rec.n_time  # Rayleigh-Ritz on the last subspace
    evals, evecs = torch.linalg.eigh(sym(small))
    order = torch.argsort(evals, descending=True)[:n]
    proj = None if keep is None else keep @ evecs[:, order]
    return V @ evecs[:, order], evals[order], proj


def _project_groups(rec, C: torch.Tensor, dev) -> torch.Tensor:
    """``z[t, g] = C_g' y_g[t]`` for every group of a recording: (T_r, G_r, n) float64, with
    ``C`` (N_r, n) in the recording's column order (zero rows for unplaced neurons)."""
    z = torch.empty((rec.n_time, len(rec.slices), C.shape[1]), dtype=torch.float64, device=dev)
    C32 = C.to(rec.dtype)
    for t0, y in rec.chunks(dev):
        z[t0 : t0 + y.shape[0]] = _group_products(rec, y, C32).to(torch.float64)
    return z


def _start_lagged(
    data: StitchedData, k: int, V: torch.Tensor, moments, z: torch.Tensor | None = None
) -> torch.Tensor:
    """``X_s = sum_(g,h allowed) sum_t z_g[t+s] z_h[t]' / (T-s)`` (K, n, n) of recording k
    with loadings ``V`` (N_r, n): the lagged covariances of its latents, over the pairs the
    loss sees (``= V' S_r(s) V / (T-s)`` from the masked moments), from its projections
    ``z`` (T_r, G_r, n) when given (else formed by a pass)."""
    rec, K = data.recordings[k], data.lags
    T = rec.n_time
    if moments is not None:
        return torch.stack([V.T @ moments[s] @ V / (T - s) for s in range(K)])
    if z is None:
        z = _project_groups(rec, V, data.device)  # (T, G, n)
    za = torch.einsum("gh,thn->tgn", _allowed(data, rec), z)
    n = V.shape[1]
    return torch.stack(
        [z[s:].reshape(-1, n).T @ za[: T - s].reshape(-1, n) / (T - s) for s in range(K)]
    )


def warm_start(
    data: StitchedData, n: int, seed: int = 0, ridge: float = 1e-6, term: DataTerm | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Deterministic start ``(C (N, n), X (K, n, n))`` (module docstring, step 1), and warnings
    for recordings that share no neuron with the recordings placed before them. Held-out
    pairs take no part in it. Recordings on the moments route of ``term`` are read from their
    moments, the others from the data (two passes for the PCA, which also give its latents'
    lagged covariances, and two for each later recording)."""

    def moments(k: int):
        return term.masked_moments(k) if term is not None else None

    dev = data.device
    C = torch.zeros((data.n_neurons, n), dtype=torch.float64, device=dev)
    known = np.zeros(data.n_neurons, dtype=bool)
    first = int(np.argmax([len(r.neurons) for r in data.recordings]))
    rec = data.recordings[first]
    if len(rec.neurons) < n:
        raise InputError(
            "stitched_lds.latent_dims",
            f"latent dimension {n} exceeds the {len(rec.neurons)} neurons of the largest "
            f"recording ({rec.name}); choose latent_dims of at most {len(rec.neurons)}",
        )
    mom = moments(first)
    V, _, proj = _top_subspace(data, first, n, seed, mom)
    C[torch.as_tensor(rec.neurons, device=dev)] = V
    known[rec.neurons] = True
    X = _start_lagged(data, first, V, mom, proj)  # no pass: the PCA's last one projected
    del mom
    warnings: list[str] = []
    todo = [k for k in range(len(data.recordings)) if k != first]
    while todo:
        overlap = [int(known[data.recordings[k].neurons].sum()) for k in todo]
        k = todo.pop(int(np.argmax(overlap)))
        rec = data.recordings[k]
        new = ~known[rec.neurons]
        if not new.any():
            continue
        if not (~new).any():
            warnings.append(
                f"recording {rec.name} shares no neuron with the recordings placed before it: "
                "its loadings start from its own PCA and are tied to the others only through "
                "the shared dynamics"
            )
            Vr, _, _ = _top_subspace(data, k, n, seed + k, moments(k))
            C[torch.as_tensor(rec.neurons[new], device=dev)] = Vr[torch.as_tensor(new)]
            known[rec.neurons[new]] = True
            continue
        _place_new_neurons(data, rec, C, X, known, ridge, moments(k))
        known[rec.neurons[new]] = True
    return C, X, warnings


def _place_new_neurons(
    data: StitchedData, rec, C, X, known: np.ndarray, ridge: float, moments=None
) -> None:
    """Least-squares loadings (module docstring, step 1) of the recording's neurons not yet
    placed, group by group, against the placed neurons it may pair with (not held out);
    written into ``C`` in place. ``F_s`` and ``B_s`` of every group come from one pass over
    the data (after the one that projects it), or from the recording's masked moments:
    ``F_s = S(s)[u, :] C_k``, ``B_s = S(s)[:, u]' C_k``."""
    dev = data.device
    K, n, T = data.lags, C.shape[1], rec.n_time
    rows = torch.as_tensor(rec.neurons, device=dev)
    placed = torch.as_tensor(known[rec.neurons].astype(np.float64), device=dev)
    Ck = C[rows] * placed[:, None]  # the recording's placed loadings, zero elsewhere
    allowed = _allowed(data, rec)
    counts = torch.as_tensor([T - s for s in range(K)], dtype=torch.float64, device=dev)
    todo = [g for g, sl in enumerate(rec.slices) if not known[rec.neurons[sl]].all()]
    FB: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if moments is not None:
        for g in todo:
            sl = rec.slices[g]
            FB[g] = (moments[:, sl] @ Ck, moments[:, :, sl].transpose(1, 2) @ Ck)
    else:
        zk = _project_groups(rec, Ck, dev)  # (T, G_r, n)
        z = torch.einsum("gh,thn->tgn", allowed, zk)  # placed partners of each group
        # z with K - 1 zero rows either side: row t - s (F) and t + s (B) of every lag s
        # gathered for a window's rows at once, so that each group's columns are read once
        # per window (one product for all 2K lags) rather than once per lag
        pad = torch.zeros((K - 1, *z.shape[1:]), dtype=z.dtype, device=dev)
        zpad = torch.cat([pad, z, pad])
        lag = torch.arange(K, device=dev)
        acc = {g: None for g in todo}  # (m, 2K n): F's lags, then B's
        for t0, y in rec.chunks(dev):
            at = torch.arange(t0 + K - 1, t0 + K - 1 + y.shape[0], device=dev)[:, None]
            index = torch.cat([at - lag, at + lag], 1)  # (rows, 2K) rows of zpad
            for g in todo:
                Z = zpad[index, g].reshape(y.shape[0], 2 * K * n)  # zero where t -+ s is off
                # in the data's type (float32: twice the speed), summed over windows in float64
                part = (y[:, rec.slices[g]].T @ Z.to(y.dtype)).to(torch.float64)
                acc[g] = part if acc[g] is None else acc[g].add_(part)
        for g in todo:
            both = acc[g].reshape(-1, 2, K, n).permute(1, 2, 0, 3)  # (2, K, m, n)
            FB[g] = (both[0], both[1])
    for g in todo:
        sl = rec.slices[g]
        F, B = (M / counts[:, None, None] for M in FB[g])
        G = sum(
            Ck[h.start : h.stop].T @ Ck[h.start : h.stop] * allowed[g, j]
            for j, h in enumerate(rec.slices)
        )
        H = sum(X[s] @ G @ X[s].T + X[s].T @ G @ X[s] for s in range(K))
        rhs = sum(F[s] @ X[s].T + B[s] @ X[s] for s in range(K))
        H = H + ridge * torch.trace(H) / n * torch.eye(n, dtype=H.dtype, device=dev)
        C[rows[sl]] = torch.linalg.solve(H, rhs.T).T  # a group is placed whole or not at all
