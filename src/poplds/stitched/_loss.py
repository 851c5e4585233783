"""The moment-matching loss and its gradient, without any neuron-by-neuron matrix of all neurons.

Model lagged covariances (``C``: (N, n), ``X``: (K, n, n), ``R``: (N,)):

    M_s(i, j) = cov(y_i[t+s], y_j[t]) = C_i X_s C_j' + [s = 0, i = j] R_i

The loss sums, over lags s < K and neuron pairs (i, j) observed together at lag s (and not
held out), the squared difference to the pooled empirical covariance Ĉ_s(i, j), divided by the
number P of such pairs:

    L = (1/P) sum_s sum_(i,j) (M_s(i, j) - Ĉ_s(i, j))^2

``R`` is profiled out: ``R_i = max(0, v_i - C_i X_0 C_i')`` with ``v_i`` the empirical
variance, which leaves the hinge ``max(0, C_i X_0 C_i' - v_i)^2`` on the lag-0 diagonal.
Expanding the square over groups g, h (neurons with one observation pattern) gives, up to the
constant sum of Ĉ^2 (which needs every pair and is never computed),

    P L~ = sum_s sum_(g~h) tr(X_s' G_g X_s G_h)                          model^2, G_g = C_g' C_g
         - 2 sum_r D_r                                                   model x data
         - sum_i (m_i^2 - 2 m_i d_i) + sum_i max(0, m_i - v_i)^2          lag-0 diagonal

with ``m_i = C_i X_0 C_i'``, ``d_i`` the lag-0 diagonal of the data, and the data term of
recording r (neurons of groups g, h in r, ``w_gh(s) = 1/n_gh(s)``, 0 for held-out pairs)

    D_r = sum_s sum_(u >= s) sum_(g,h) w_gh(s) z_g[u]' X_s z_h[u-s],   z_g[u] = C_g' y_g[u]  (2)
        = sum_s < S~_r(s), C_r X_s C_r' >,   S~_r(s) = w(s) o sum_(u >= s) y[u] y[u-s]'     (3)

Each recording's ``D_r`` is computed by the cheaper of two routes (:class:`DataTerm`):

- ``data``: eq. (2) from the data, window by window. A window holds rows ``[t0, t1)`` and the
  ``h = min(K-1, t0)`` rows before them, and counts the pairs whose later row ``u`` lies in
  it, so every pair is counted once; its projections ``Z = Y C`` and the gradient
  ``Y' dD/dZ`` use the same rows, and one pass reads each row once (the ``K-1`` halo rows
  twice). About ``4 T N_r n`` flops per pass, plus ``O(T K G_r n (G_r + n))`` for eq. (2).
- ``moments``: eq. (3) from the lagged second moments ``S~_r`` (K, N_r, N_r), formed in one
  pass over the data and reused by every evaluation: ``4 K N_r^2 n`` flops per pass, never
  reading the data again. Chosen when that is cheaper over a fit's passes and the moments fit
  in memory (:func:`choose_routes`).

Both routes give the same ``D_r`` and gradients (a test). A *window* of the data route is also
the minibatch of the stochastic optimiser: ``sum_c D_r,c`` over a recording's windows is
exactly ``D_r``, so with windows drawn uniformly from ``M`` windows, ``M D_r,c`` is an unbiased
estimate of the data route's terms and the mean of the minibatch gradients over an epoch
(every window once) is the full-batch gradient at a fixed point.

float32 products of the data, accumulated over windows in float64; everything after ``Z`` is
float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .._distributed import all_sum
from .._logging import get_logger
from ._access import DataAccess, Window
from ._data import RecordingBlock, StitchedData
from ._products import WideSum, mm_long

log = get_logger()

#: Passes a fit is expected to take, for the choice of routes (two L-BFGS stages, measured).
EXPECTED_PASSES = 300

#: Weight of one flop of eq. (2)'s small, memory-bound products against one of a large matrix
#: product: an estimate. On the cases measured (``benchmarks/bench_stitched.py sessions`` and
#: ``paper``) the routes it picks were the faster ones (e.g. ten recordings of 170 neurons:
#: 0.60 s per pass on the data, 0.01 s on moments).
CROSS_FLOP_COST = 8.0


def window_cross(
    Z: torch.Tensor, h: int, X: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. (2) on one window and its gradients.

    ``Z``: (L, G_r, n) projections of the window's rows, the first ``h`` of them halo rows
    (pairs whose later row is a halo row belong to the window before); ``X``: (K, n, n);
    ``w``: (K, G_r, G_r). Returns ``(D, dD/dZ (L, G_r, n), dD/dX (K, n, n))``, float64.

    Lag by lag through ``V_s[u, g] = sum_h w_gh(s) z_h[u-s]``, one matrix product each, so the
    cost is ``O(L K G_r n (G_r + n))`` and memory ``O(L G_r n)``.
    """
    L, G, n = Z.shape
    Zg = Z.permute(1, 0, 2).contiguous()  # (G, L, n): per lag every step is one GEMM
    flat = Zg.view(G, L * n)
    dZ = torch.zeros_like(Zg)
    dZf = dZ.view(G, L * n)
    dX = torch.zeros_like(X)
    total = Z.new_zeros(())
    for s in range(X.shape[0]):
        lo = max(h, s)
        if lo >= L:
            continue
        V = w[s] @ flat[:, (lo - s) * n : (L - s) * n]  # (G, (L-lo) n): sum_h w_gh z_h[u-s]
        ZX = (Zg.view(G * L, n) @ X[s]).view(G, L * n)[:, lo * n :]  # z_g[u]' X_s
        total = total + torch.sum(ZX * V)
        V3 = V.view(G, L - lo, n)
        dZ[:, lo:] += V3 @ X[s].T  # through z_g[u]
        dZf[:, (lo - s) * n : (L - s) * n] += w[s].T @ ZX  # through z_h[u-s]
        dX[s] = Zg[:, lo:].reshape(-1, n).T @ V.view(-1, n)
    return total, dZ.permute(1, 0, 2), dX


def lagged_moments(
    rec: RecordingBlock,
    lags: int,
    device: torch.device,
    weights: torch.Tensor | None = None,
    windows: Iterable[tuple[int, torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """``S_r(s) = sum_(u >= s) y[u] y[u-s]'`` (K, N_r, N_r) float64 over ``windows``
    (``(t0, halo, rows)`` covering the recording once, each with its ``K-1`` halo rows;
    default: every window of ``rec``), in its prepared, group-sorted columns; multiplied
    entry by entry by the group weights ``w_gh(s)`` when ``weights`` (K, G_r, G_r) is given
    (``S~_r`` of eq. (3))."""
    n_r = len(rec.neurons)
    S = torch.zeros((lags, n_r, n_r), dtype=torch.float64, device=device)
    blocks = rec.windows(device, halo=lags - 1) if windows is None else windows
    for _, halo, window in blocks:
        h = halo.shape[0]
        y = torch.cat([halo, window]) if h else window
        L = y.shape[0]
        for s in range(lags):
            lo = max(h, s)
            if lo < L:
                S[s] += (y[lo:].T @ y[lo - s : L - s]).to(torch.float64)
    if weights is not None:
        S *= expand_groups(rec, weights)
    return S


def expand_groups(rec: RecordingBlock, M: torch.Tensor) -> torch.Tensor:
    """(K, G_r, G_r) group-pair values to (K, N_r, N_r) neuron pairs of the recording."""
    sizes = torch.as_tensor([sl.stop - sl.start for sl in rec.slices], device=M.device)
    gid = torch.repeat_interleave(torch.arange(len(rec.slices), device=M.device), sizes)
    return M[:, gid][:, :, gid]


def route_costs(rec: RecordingBlock, lags: int, n_latent: int) -> dict[str, float]:
    """Modelled flops of a fit's ``EXPECTED_PASSES`` passes over one recording by each route,
    and the bytes its moments take (module docstring)."""
    T, N, G, n, K = rec.n_time, len(rec.neurons), len(rec.slices), n_latent, lags
    data = EXPECTED_PASSES * (4 * T * N * n + CROSS_FLOP_COST * 2 * T * K * G * n * (G + 2 * n))
    moments = T * N * N * K + EXPECTED_PASSES * 4 * K * N * N * n
    return {"data": float(data), "moments": float(moments), "moment_bytes": 8.0 * K * N * N}


def choose_routes(
    data: StitchedData,
    n_latent: int,
    route: str | Sequence[str] = "auto",
    max_bytes: float | None = None,
) -> list[str]:
    """Each recording's route, ``data`` or ``moments`` (``route`` one for all, or one per
    recording): with ``auto``, moments where their modelled cost is lower and they fit in
    ``max_bytes`` (all moments together; default :attr:`StitchedData.moment_budget`)."""
    if not isinstance(route, str):
        if len(route) != len(data.recordings) or set(route) - {"data", "moments"}:
            raise ValueError(f"one route (data or moments) per recording, got {route!r}")
        return list(route)
    if route not in ("auto", "data", "moments"):
        raise ValueError(f"route must be auto, data or moments, got {route!r}")
    if route != "auto":
        return [route] * len(data.recordings)
    budget = max_bytes if max_bytes is not None else data.moment_budget
    out = []
    for rec in data.recordings:
        c = route_costs(rec, data.lags, n_latent)
        cheaper = c["moments"] < c["data"]
        if cheaper and c["moment_bytes"] <= budget:
            budget -= c["moment_bytes"]
            out.append("moments")
        else:
            out.append("data")
    return out


def moments_term(
    S: torch.Tensor, Cr: torch.Tensor, X: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. (3) for one recording from its weighted lagged moments ``S`` (K, N_r, N_r) and
    loadings ``Cr`` (N_r, n): ``(D_r, dD_r/dX (K, n, n), dD_r/dC_r (N_r, n))``."""
    SC = S @ Cr  # (K, N_r, n)
    StC = S.transpose(1, 2) @ Cr
    D = torch.einsum("ia,sab,sib->", Cr, X, SC)
    dX = torch.einsum("ia,sib->sab", Cr, SC)
    return D, dX, torch.einsum("sib,sab->ia", SC, X) + (StC @ X).sum(0)


def window_term(
    halo: torch.Tensor,
    y: torch.Tensor,
    CT: torch.Tensor,
    X: torch.Tensor,
    w: torch.Tensor,
    slices: Sequence[slice],
    acc: WideSum,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. (2) on one window ``y`` (L, N_r) of a recording with its ``halo`` rows (h, N_r)
    before it; ``CT``: the recording's ``C'`` (n, N_r) in the data's type; ``w``: its group
    weights (K, G_r, G_r); ``slices``: its groups' columns. ``(dD/dZ)' Y`` is added into
    ``acc`` (n, N_r). Returns (D, dD/dX, the projections (G_r, n, h + L) float64). The
    products are written ``C_g' Y_g'`` and ``dZ_g' Y_g``, which BLAS runs about twice as
    fast as ``Y_g C_g`` on these shapes."""
    h = halo.shape[0]

    def project(rows: torch.Tensor) -> torch.Tensor:  # (G, n, rows)
        return torch.stack([mm_long(CT[:, sl], rows[:, sl].T) for sl in slices])

    Zt = project(y).to(torch.float64)
    if h:  # only the projections are joined, never the data
        Zt = torch.cat([project(halo).to(torch.float64), Zt], dim=2)
    D, dZ, dX = window_cross(Zt.permute(2, 0, 1), h, X, w)
    dZt = dZ.permute(1, 2, 0).to(y.dtype).contiguous()  # (G, n, h + L)
    for g, sl in enumerate(slices):
        acc.add(g, dZt[g, :, h:], y[:, sl])
        if h:
            acc.add(g, dZt[g, :, :h], halo[:, sl])
    acc.step()
    return D, dX, Zt


class DataTerm:
    """The model x data term ``sum_r D_r`` of every recording by its route, and its
    gradients (module docstring): the loss algebra over rows that :class:`._access.DataAccess`
    reads (``access``; this rank's share of them), summed over ranks.

    ``weights``: (K, G, G) from :meth:`StitchedData.weights`; ``route``: ``auto``, ``data``
    or ``moments`` for every recording; ``window_rows``: rows per minibatch window of the
    data route (default: the recording's read chunk, which full passes use).
    """

    def __init__(
        self,
        data: StitchedData,
        weights: torch.Tensor,
        n_latent: int,
        *,
        route: str | Sequence[str] = "auto",
        window_rows: int | None = None,
    ) -> None:
        self.data = data
        self.n_latent = n_latent
        dev = data.device
        self.routes = choose_routes(data, n_latent, route)
        self.access = DataAccess(data, self.routes, window_rows)
        groups = [torch.as_tensor(r.groups, device=dev) for r in data.recordings]
        self.w = [weights[:, g][:, :, g] for g in groups]
        self.index = [torch.as_tensor(r.neurons, device=dev) for r in data.recordings]
        self.moments: list[torch.Tensor | None] = [None] * len(data.recordings)
        # every rank forms every moment (they are small by choice): the warm start, which
        # reads them, is then the same on any number of ranks; each evaluates its own
        for k, (rec, how) in enumerate(zip(data.recordings, self.routes, strict=True)):
            if how == "moments":
                blocks = self.access.all_windows(k, dev)
                self.moments[k] = lagged_moments(rec, data.lags, dev, self.w[k], blocks)
        counts = {how: self.routes.count(how) for how in ("data", "moments")}
        log.info(
            "data term: %d recordings from their lagged moments, %d from the data",
            counts["moments"],
            counts["data"],
        )

    def masked_moments(self, k: int) -> torch.Tensor | None:
        """Recording k's lagged sums ``S_r(s)`` (K, N_r, N_r) with the held-out pairs set to
        0 (what the warm start may see), or None on the data route."""
        if self.moments[k] is None:
            return None
        rec = self.data.recordings[k]
        g = torch.as_tensor(rec.groups, device=self.data.device)
        counts = torch.as_tensor(self.data.pair_count, device=self.data.device)[:, g][:, :, g]
        return self.moments[k] * expand_groups(rec, counts)

    def windows(self) -> list[Window]:
        """Every minibatch window of the data route (:meth:`._access.DataAccess.windows`)."""
        return self.access.windows()

    def _wide_sum(self, k: int) -> WideSum:
        """The accumulator of recording k's data-route gradient ``(dD/dZ)' Y`` (n, N_r)."""
        rec = self.data.recordings[k]
        return WideSum(self.n_latent, rec.slices, len(rec.neurons), rec.dtype, self.data.device)

    def moments_term(self, k: int, C: torch.Tensor, X: torch.Tensor, gC: torch.Tensor):
        """Eq. (3) for recording k (:func:`moments_term`), its gradient added into ``gC``
        (N, n); returns (D, dD/dX)."""
        D, dX, gCr = moments_term(self.moments[k], C[self.index[k]], X)
        gC.index_add_(0, self.index[k], gCr)
        return D, dX

    def full(
        self,
        C: torch.Tensor,
        X: torch.Tensor,
        recordings: Sequence[int] | None = None,
        keep: dict[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sum_r D_r, d/dC (N, n), d/dX (K, n, n))`` over ``recordings`` (default all):
        one pass, each row of the data route read once; with several ranks, each computes
        its share (its rows, its recordings' moments) and the shares are summed. With
        ``keep`` (a dict), the projections ``z_g[t] = C_g' y_g[t]`` of this rank's rows of
        each data-route recording k (:meth:`._access.DataAccess.projection_rows`) are put in
        ``keep[k]`` (rows, G_r, n) float64."""
        gC = torch.zeros_like(C)
        D = C.new_zeros(())
        dX = torch.zeros_like(X)
        todo = range(len(self.data.recordings)) if recordings is None else recordings
        access = self.access
        for k in todo:
            rec = self.data.recordings[k]
            if self.routes[k] == "moments":
                if access.owns(k):
                    d, x = self.moments_term(k, C, X, gC)
                    D, dX = D + d, dX + x
                continue
            CT = C[self.index[k]].to(rec.dtype).T.contiguous()
            acc = self._wide_sum(k)
            span = access.span(k)
            if keep is not None:
                keep[k] = self.projection_buffer(k, 1)[0]
            for t0, halo, y in access.pass_windows(k, self.data.lags - 1, C.device):
                d, x, Zt = window_term(halo, y, CT, X, self.w[k], rec.slices, acc)
                D, dX = D + d, dX + x
                if keep is not None:  # rows [t0 - h, t1) at offset t0 - h - (span start - h0)
                    first = t0 == span[0]
                    part = Zt if first else Zt[:, :, halo.shape[0] :]
                    at = 0 if first else t0 - span[0] + access.span_halo(k)
                    keep[k][at : at + part.shape[2]] = part.permute(2, 0, 1)
            gC.index_add_(0, self.index[k], acc.result().T)
        all_sum(D, gC, dX)
        return D, gC, dX

    def projection_buffer(self, k: int, count: int) -> torch.Tensor:
        """Zeros (count, rows, G_r, n) for ``count`` directions' projections of recording k's
        :meth:`._access.DataAccess.projection_rows`."""
        t0, t1 = self.access.projection_rows(k)
        G = len(self.data.recordings[k].slices)
        return torch.zeros(
            (count, t1 - t0, G, self.n_latent), dtype=torch.float64, device=self.data.device
        )

    def sweep(
        self, Q: torch.Tensor | None, dZ: dict[int, torch.Tensor]
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """One pass over this rank's projection rows of every data-route recording, two
        products per row: the projections ``p_jg[t] = Q_jg' y_g[t]`` of the directions ``Q``
        (q, N_total, n) (None: none), and ``sum_t y[t] dZ[t]'``, the data route's gradient in
        C for ``dZ[k]`` (rows, G_r, n), the gradient of the data term with respect to
        recording k's projections. Returns ``({k: (q, rows, G_r, n)}, (N, n))``, the
        gradient summed over ranks; no halo is needed, as no lagged product is formed."""
        n = self.n_latent
        dev = self.data.device
        gC = torch.zeros((self.data.n_neurons, n), dtype=torch.float64, device=dev)
        out: dict[int, torch.Tensor] = {}
        access = self.access
        for k in access.data_recordings():
            rec = self.data.recordings[k]
            q = 0 if Q is None else Q.shape[0]
            P = self.projection_buffer(k, q)
            QT = None
            if q:  # (q n, N_r): every direction's C' at once
                QT = Q[:, self.index[k]].to(rec.dtype).permute(0, 2, 1).reshape(q * n, -1)
            dZt = dZ[k].to(rec.dtype).permute(1, 2, 0).contiguous()  # (G, n, rows)
            acc = self._wide_sum(k)
            span, h0 = access.span(k), access.span_halo(k)
            for t0, halo, y in access.pass_windows(k, h0, dev):
                parts = [(t0 - span[0] + h0, y)]
                if t0 == span[0] and halo.shape[0]:
                    parts.insert(0, (0, halo))
                for at, rows in parts:
                    L = rows.shape[0]
                    for g, sl in enumerate(rec.slices):
                        if QT is not None:
                            pg = mm_long(QT[:, sl], rows[:, sl].T).view(q, n, L)
                            P[:, at : at + L, g] = pg.permute(0, 2, 1).to(torch.float64)
                        acc.add(g, dZt[g, :, at : at + L], rows[:, sl])
                acc.step()
            out[k] = P
            gC.index_add_(0, self.index[k], acc.result().T)
        all_sum(gC)
        return out, gC

    def window(
        self,
        win: Window,
        C: torch.Tensor,
        X: torch.Tensor,
        rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(D_r,c, d/dC, d/dX)`` of one window, from its ``(halo, rows)`` (read here when
        not given)."""
        rec = self.data.recordings[win.rec]
        if rows is None:
            rows = self.access.read_window(win, C.device)
        halo, y = rows
        gC = torch.zeros_like(C)
        acc = self._wide_sum(win.rec)
        CT = C[self.index[win.rec]].to(rec.dtype).T.contiguous()
        D, dX, _ = window_term(halo, y, CT, X, self.w[win.rec], rec.slices, acc)
        gC.index_add_(0, self.index[win.rec], acc.result().T)
        return D, gC, dX

    def moments_part(self, C: torch.Tensor, X: torch.Tensor):
        """The moments route's recordings only: ``(D, d/dC, d/dX)`` (no data read)."""
        return self.full(C, X, [k for k, how in enumerate(self.routes) if how == "moments"])


class _Injected(torch.autograd.Function):
    """A value computed outside autograd, with its known gradient with respect to ``X``."""

    @staticmethod
    def forward(ctx, X: torch.Tensor, value: torch.Tensor, dX: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(dX)
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dX,) = ctx.saved_tensors
        return grad * dX, None, None


def model_terms(C: torch.Tensor, X: torch.Tensor, tensors: LossTensors) -> torch.Tensor:
    """``model^2 - diag + hinge`` of the module docstring (no data beyond the variances),
    differentiable in ``C`` (N, n) and ``X`` (K, n, n)."""
    return sorted_model_terms(C[tensors.by_group], X, tensors)


def sorted_model_terms(Cs: torch.Tensor, X: torch.Tensor, tensors: LossTensors) -> torch.Tensor:
    """:func:`model_terms` from ``Cs`` (N_obs, n): the observed neurons' loadings sorted by
    group (``tensors.by_group``), so ``G_g = C_g' C_g`` is one GEMM per group."""
    parts = torch.split(Cs, [b - a for a, b in tensors.group_bounds])  # one cat backward
    G = torch.stack([c.T @ c for c in parts])
    return model_square(G, X, tensors) + diagonal_terms(Cs, X[0], tensors)


def model_square(G: torch.Tensor, X: torch.Tensor, tensors: LossTensors) -> torch.Tensor:
    """``sum_s sum_(g~h) tr(X_s' G_g X_s G_h)`` from the groups' Gram matrices ``G``
    (G, n, n)."""
    XtGX = torch.einsum("sab,gac,scd->sgbd", X, G, X)
    return torch.einsum("sgbd,hdb,sgh->", XtGX, G, tensors.coobserved)


def diagonal_terms(Cs: torch.Tensor, X0: torch.Tensor, tensors: LossTensors) -> torch.Tensor:
    """The lag-0 diagonal's ``- sum_i (m_i^2 - 2 m_i d_i) + sum_i max(0, m_i - v_i)^2``,
    ``m_i = C_i X_0 C_i'``, from the sorted loadings ``Cs`` (N_obs, n)."""
    m = torch.sum((Cs @ X0) * Cs, dim=1)
    d, v = tensors.diag0, tensors.variance
    return -torch.sum(m * m - 2 * m * d) + torch.sum(torch.clamp(m - v, min=0) ** 2)


@dataclass(frozen=True)
class LossTensors:
    """The data's small bookkeeping arrays the model terms need, on the fit's device.

    by_group: (N_obs,) the observed neurons' positions, sorted by group (stable);
    group_bounds: (G,) ``(first, stop)`` of each group's rows in that order;
    coobserved: (K, G, G) float64, 1 where groups g and h are observed together at lag s;
    diag0, variance: (N_obs,) the lag-0 diagonal of the data and the empirical variances, in
    ``by_group`` order; n_pairs: () P, the pairs the loss sums over (at least 1).
    """

    by_group: torch.Tensor
    group_bounds: list[tuple[int, int]]
    coobserved: torch.Tensor
    diag0: torch.Tensor
    variance: torch.Tensor
    n_pairs: torch.Tensor

    @classmethod
    def of(cls, data: StitchedData, device: torch.device) -> LossTensors:
        """From prepared data."""
        obs = data.group_of >= 0
        by_group = np.flatnonzero(obs)[np.argsort(data.group_of[obs], kind="stable")]
        bounds = np.concatenate([[0], np.cumsum(data.group_size)]).astype(int)
        return cls(
            by_group=torch.as_tensor(by_group, device=device),
            group_bounds=list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)),
            coobserved=torch.as_tensor((data.pair_count > 0).astype("float64"), device=device),
            diag0=torch.as_tensor(data.diag0[by_group], device=device),
            variance=torch.as_tensor(data.variance[by_group], device=device),
            n_pairs=torch.tensor(max(1.0, data.n_pairs()), dtype=torch.float64, device=device),
        )


def assemble(
    C: torch.Tensor,
    X: torch.Tensor,
    tensors: LossTensors,
    D: torch.Tensor,
    gC_data: torch.Tensor,
    dX_data: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``L~ = (model terms - 2 D) / P`` and its gradient in ``C``, from the data term ``D``
    and its gradients (full or estimated); ``X``'s gradient (through its graph) is
    accumulated by ``backward``."""
    Cl = C.detach().requires_grad_(True)
    P = tensors.n_pairs
    loss = (model_terms(Cl, X, tensors) - 2 * _Injected.apply(X, D, dX_data)) / P
    loss.backward()
    return loss.detach(), Cl.grad - (2 / P) * gC_data


def loss_and_grad(
    term: DataTerm, C: torch.Tensor, X: torch.Tensor, tensors: LossTensors
) -> tuple[torch.Tensor, torch.Tensor]:
    """One full pass: ``L~`` and its gradient with respect to ``C`` (N_total, n), float64.

    ``X`` may carry an autograd graph (it is a function of A and Pi in the linked stage); its
    gradient is accumulated by ``backward`` as usual.
    """
    with torch.no_grad():
        D, gC, dX = term.full(C.detach(), X.detach())
    return assemble(C, X, tensors, D, gC, dX)
