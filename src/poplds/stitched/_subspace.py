"""Subspace moment matching: each read of the data adds a gradient to a small basis of
loadings, and between reads the loss is minimised exactly over that basis, without the data.

This is the sequential subspace optimisation of Narkiss & Zibulevsky (2005, SESOP) fitted to
the structure of the loss (``_loss``): the data route enters it only through the projections
``z_g[t] = C_g' y_g[t]``, which are linear in ``C``. With the observed neurons' rows sorted by
group g, a current point ``D_0`` and directions ``D_1 .. D_m`` (each (N_obs, n)), a stage's
loadings are restricted to

    C_g = D_0g Gamma_g + sum_j gamma_jg D_jg,     Gamma_g (n, n), gamma_jg scalars        (1)

and its projections to

    z_g[t] = Gamma_g' p_0g[t] + sum_j gamma_jg p_jg[t],     p_jg[t] = D_jg' y_g[t]        (2)

with ``p`` stored once per direction (rows, G_r, n for each data-route recording). The loss
over (1) and the stage's own parameters (``X_s``, or ``A`` and ``L``) is then exact without
reading the data: eq. (2) of ``_loss`` on the projections, the model terms on ``C`` and the
moments route on ``C``. An inner L-BFGS minimises it to convergence; it starts at
``Gamma = I, gamma = 0``, the last point, so the loss never rises from one step to the next.

One *pass* over the data then does two products per row, as an L-BFGS pass does: the
projections of the direction queued by the pass before, and the data route's gradient
``sum_t y[t] dL/dz[t]'`` at the new point (``dL/dz`` is known from (2)). The gradient, made
orthogonal per group to ``D_0 Gamma`` and to the other directions and scaled to ``D_0``'s
norm, is the next queued direction; the basis keeps the last ``memory`` of them and the last
step ``D_0(new) - D_0(old)`` (whose projections are known too). The first pass of a fit forms
``p_0`` and the gradient at the start in one read (:meth:`._loss.DataTerm.full`); a second
stage starts from the first one's basis, without reading the data.

Each pass is one step; the stage has converged when the loss has fallen by at most ``tol``
times its sampling noise over the last ``WINDOW`` passes, and it stops at ``max_passes``
otherwise. The projections are float32 products accumulated in float64, as in ``_loss``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .._distributed import all_sum, rank_and_size
from .._logging import get_logger
from ._loss import (
    DataTerm,
    assemble,
    diagonal_terms,
    model_square,
    sorted_model_terms,
    window_cross,
)

log = get_logger()

#: Passes over which the loss must fall by more than ``tol x noise``.
WINDOW = 3

#: Gradient directions kept in the basis (besides the current point and the last step).
MEMORY = 6

#: Iterations of the inner L-BFGS at most, per pass.
INNER_ITERATIONS = 60

#: The key under which :meth:`Basis._rebuild` carries a vector's coordinates in the old basis
#: beside its projections.
COORDS = -1


class Basis:
    """The current point ``D_0``, the directions ``D_1 .. D_m``, their projections and the
    lagged moments of the projections (module docstring).

    Rows of the loadings are the observed neurons in ``by_group`` order (``tensors`` from
    :func:`._loss.loss_tensors`); ``gid`` is the group of each row. For each data-route
    recording k, ``P[k]`` (m+1, rows, G_r, n) holds the projections of this rank's
    :meth:`._loss.DataTerm.projection_rows` and ``M[k]`` their lagged moments
    ``M_s = sum_u p[u] p[u-s]'`` (K, d, d), ``d = (m+1) G_r n``, over the pairs this rank
    counts, summed over ranks, stored as (G_r, K d, (m+1) n) with the columns of each slot
    together: the data term at any coefficients is a function of ``M`` alone.
    """

    def __init__(self, term: DataTerm, tensors: dict) -> None:
        self.term = term
        self.order = tensors["by_group"]
        self.bounds = tensors["group_bounds"]
        dev = term.data.device
        self.gid = torch.cat(
            [torch.full((b - a,), g, device=dev) for g, (a, b) in enumerate(self.bounds)]
        )
        self.data_recs = [k for k, how in enumerate(term.routes) if how == "data"]
        self.moment_recs = [k for k, how in enumerate(term.routes) if how == "moments"]
        self.slots = {
            k: torch.as_tensor(term.data.recordings[k].groups, device=dev) for k in self.data_recs
        }
        self.D: list[torch.Tensor] = []  # D[0] the point, then the directions; (N_obs, n)
        self.Et = torch.zeros(0)  # the D side by side, transposed (:meth:`refresh`)
        self.kinds: list[str] = []  # of D[1:]: "gradient" or "step"
        self.P: dict[int, torch.Tensor] = {}
        self.M: dict[int, torch.Tensor] = {}
        self.Mflat: dict[int, torch.Tensor] = {}  # the same (K, d, d), columns (a, slot, n)
        self.queued: torch.Tensor | None = None  # (N_obs, n), projections not yet formed
        self.linear_diagonal_ok = not self.moment_recs and len(
            self.order
        ) < LINEAR_DIAGONAL_SHARE * float(tensors["n_pairs"])

    @property
    def m(self) -> int:
        """Directions besides the point."""
        return len(self.D) - 1

    def start(self, D0: torch.Tensor, P0: dict[int, torch.Tensor]) -> None:
        """Begin with the point ``D0`` (N_obs, n) and its projections ``P0[k]`` (rows, G_r, n)."""
        self.D, self.kinds = [D0], []
        self.P = {k: P0[k][None] for k in self.data_recs}
        self.refresh()

    def refresh(self) -> None:
        """Lay out the basis (:meth:`_layout`) and form the lagged moments ``M`` of the
        stored projections from scratch: one GEMM per lag and recording, summed over ranks
        (:meth:`_extend` and :meth:`_transform` keep them up to date afterwards)."""
        self._layout()
        self.Mflat = {k: self._lagged(self._flat(self.P[k]), None, k) for k in self.data_recs}
        if self.Mflat:
            all_sum(*self.Mflat.values())
        self._slot_layout()

    def _layout(self) -> None:
        """Lay the basis side by side, ``E' = [D_0 D_1 ... D_m]'`` ((m+1) n, N_obs), with
        ``D`` views of it (the loadings of any coefficients are then one product per group;
        in this layout both it and its gradient run about 3x faster than with rows of E),
        and form its groups' Gram matrices ``W``."""
        n = self.D[0].shape[1]
        self.Et = torch.stack([d.T for d in self.D]).reshape(-1, self.D[0].shape[0])
        self.D = [self.Et[a * n : (a + 1) * n].T for a in range(len(self.D))]
        parts = torch.split(self.Et, [b - a for a, b in self.bounds], dim=1)
        self.W = torch.stack([Et_g @ Et_g.T for Et_g in parts])  # (G, d1, d1): E_g' E_g

    @staticmethod
    def _flat(P: torch.Tensor) -> torch.Tensor:
        """Projections (a, rows, G_r, n) as (rows, a G_r n), columns ordered (a, slot, n)."""
        a, R, G, n = P.shape
        return P.permute(1, 0, 2, 3).reshape(R, a * G * n)

    def _lagged(self, left: torch.Tensor, right: torch.Tensor | None, k: int) -> torch.Tensor:
        """``sum_u left[u] right[u - s]'`` (K, left cols, right cols) over the pairs this rank
        counts in recording k (rows before its span's halo start no pair); ``right`` None:
        ``left``."""
        right = left if right is None else right
        K, R, h = self.term.data.lags, left.shape[0], self.term.span_halo(k)
        M = left.new_zeros((K, left.shape[1], right.shape[1]))
        for s in range(K):
            lo = max(h, s)
            if lo < R:
                M[s] = left[lo:].T @ right[lo - s : R - s]
        return M

    def _transform(self, Mf: torch.Tensor, coords: torch.Tensor, k: int) -> torch.Tensor:
        """The moments of a new basis from the old one's: ``coords`` (m'+1, (m+1) n, G, n)
        gives each new direction in the old basis, group by group (``D'_bg = E_g coords[b,
        :, g]``); the projections are the same combinations of the old ones, so recording
        k's moments (K, d, d) become ``T' M_s T``, ``T`` block diagonal over its slots: no
        pass over the stored projections."""
        K, n = Mf.shape[0], coords.shape[3]
        a0, a1 = coords.shape[1] // n, coords.shape[0]
        Tk = coords[:, :, self.slots[k]].view(a1, a0, n, -1, n)  # (b, a, i, r, j)
        R = Tk.shape[3]
        M = Mf.view(K, a0, R, n, a0, R, n)  # (s, a, r, i, c, q, l)
        left = torch.einsum("bairj,saricql->sbrjcql", Tk, M)
        out = torch.einsum("sbrjcql,dclqm->sbrjdqm", left, Tk)
        return out.reshape(K, a1 * R * n, a1 * R * n)

    def _slot_layout(self) -> None:
        """``M[k]`` (G_h, K d, (m+1) n) from ``Mflat[k]``: the columns of each slot h
        together, as :meth:`data_term` takes them."""
        K = self.term.data.lags
        self.M = {}
        for k, M in self.Mflat.items():
            a1, G, n = self.P[k].shape[0], self.P[k].shape[2], self.P[k].shape[3]
            d = a1 * G * n
            self.M[k] = M.view(K, d, a1, G, n).permute(3, 0, 1, 2, 4).reshape(G, K * d, a1 * n)

    def _extend(self, Pq: dict[int, torch.Tensor]) -> None:
        """Append the moments of a new direction's projections ``Pq[k]`` (rows, G_r, n) with
        the stored ones and with themselves: per lag two GEMMs of ``rows x d x G_r n`` and one
        of ``rows x G_r n x G_r n`` (not the ``rows x d x d`` of forming ``M`` again), summed
        over ranks."""
        blocks = {}
        for k in self.data_recs:
            R, G, n = Pq[k].shape
            new, old = Pq[k].reshape(R, G * n), self._flat(self.P[k])
            # (K, d, e), (K, e, d), (K, e, e): old x new, new x old, new x new
            blocks[k] = [self._lagged(a, b, k) for a, b in ((old, new), (new, old), (new, None))]
        if blocks:
            all_sum(*(b for bs in blocks.values() for b in bs))
        for k, (on, no, nn) in blocks.items():
            self.Mflat[k] = torch.cat(
                [torch.cat([self.Mflat[k], on], dim=2), torch.cat([no, nn], dim=2)], dim=1
            )

    # -- the restricted parameterisation, eqs. (1) and (2) ---------------------------------
    def coefficients(self, Gam: torch.Tensor, gam: torch.Tensor, k: int) -> torch.Tensor:
        """(m+1, G_r, n, n): recording k's slots' ``Gamma_g`` and ``gamma_jg I``."""
        n = Gam.shape[1]
        B = self.stacked(Gam, gam).view(len(self.bounds), -1, n, n)
        return B[self.slots[k]].transpose(0, 1)

    def stacked(self, Gam: torch.Tensor, gam: torch.Tensor) -> torch.Tensor:
        """``B_g`` (G, (m+1) n, n): the coefficients of group g, ``C_g = E_g B_g``."""
        n = Gam.shape[1]
        eye = torch.eye(n, dtype=Gam.dtype, device=Gam.device)
        B = torch.cat([Gam[:, None], gam.T[:, :, None, None] * eye], dim=1)  # (G, m+1, n, n)
        return B.reshape(len(self.bounds), -1, n)

    def loadings(self, Gam: torch.Tensor, gam: torch.Tensor) -> torch.Tensor:
        """``C`` (N_obs, n) of eq. (1), differentiable in ``Gam`` (G, n, n), ``gam`` (m, G)."""
        B = self.stacked(Gam, gam)
        parts = torch.split(self.Et, [b - a for a, b in self.bounds], dim=1)
        return torch.cat([(B[g].T @ Et_g).T for g, Et_g in enumerate(parts)])

    def projections(self, k: int, Gam: torch.Tensor, gam: torch.Tensor) -> torch.Tensor:
        """``z`` (rows, G_r, n) of recording k at the coefficients, by eq. (2)."""
        return torch.einsum("atgn,agnm->tgm", self.P[k], self.coefficients(Gam, gam, k))

    def data_term(self, Gam: torch.Tensor, gam: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """The data route's ``sum_r D_r`` (all ranks' rows) at the coefficients, from ``M``,
        differentiable: ``sum_s sum_gh w_gh(s) <X_s, B_g' M_s(g, h) B_h>`` with ``B_g`` the
        coefficients of slot g (two batched products per recording)."""
        K, n = X.shape[0], X.shape[1]
        total = X.new_zeros(())
        for k in self.data_recs:
            coef = self.coefficients(Gam, gam, k)  # (a1, G, n, n)
            a1, G = coef.shape[0], coef.shape[1]
            by_slot = coef.permute(1, 0, 2, 3).reshape(G, a1 * n, n)  # B_h, rows (b, k)
            T1 = torch.bmm(self.M[k], by_slot)  # (G_h, K (a1 G n), n): M_s B_h
            T1 = T1.view(G, K, a1, G, n, n).permute(3, 2, 4, 0, 1, 5).reshape(G, a1 * n, -1)
            ZZ = torch.bmm(by_slot.transpose(1, 2), T1).view(G, n, G, K, n)  # B_g' M_s B_h
            total = total + torch.einsum("sgh,sjl,gjhsl->", self.term.w[k], X, ZZ)
        return total

    def loss(self, Gam, gam, X, tensors: dict, diagonal=None) -> torch.Tensor:
        """``L~`` (``_loss``) at the coefficients (1) and ``X``, exact and differentiable,
        without reading the data: the data route from ``M``, the model's square terms from
        the groups' Gram matrices ``B_g' W_g B_g``, the moments route and the lag-0 diagonal
        on ``C`` (every rank holds every recording's moments, so no rank waits for another).
        With ``diagonal`` (:meth:`linear_diagonal`) the diagonal is its first-order
        expansion instead, and no neuron-sized array is touched when no recording is on the
        moments route."""
        D = self.data_term(Gam, gam, X)
        B = self.stacked(Gam, gam)
        square = model_square(torch.einsum("gxa,gxy,gyb->gab", B, self.W, B), X, tensors)
        Cs = self.loadings(Gam, gam) if diagonal is None or self.moment_recs else None
        if self.moment_recs:
            Cf = self.full_loadings(Cs.detach())
            gC, dX = torch.zeros_like(Cf), torch.zeros_like(X)
            Dm = X.new_zeros(())
            with torch.no_grad():
                for k in self.moment_recs:
                    d, x = self.term._moments_term(k, Cf, X.detach(), gC)
                    Dm, dX = Dm + d, dX + x
            D = D + Dm + torch.sum(gC[self.order] * (Cs - Cs.detach()))
            D = D + torch.sum(dX * (X - X.detach()))
        if diagonal is None:
            diag = diagonal_terms(Cs, X[0], tensors)
        else:
            value, grads, at = diagonal
            diag = value + sum(
                torch.sum(g * (v - v0))
                for g, v, v0 in zip(grads, (Gam, gam, X[0]), at, strict=True)
            )
        return (square + diag - 2 * D) / tensors["n_pairs"]

    def linear_diagonal(self, Gam, gam, X0, tensors: dict):
        """The lag-0 diagonal terms at the coefficients and ``X_0`` and their gradients: the
        first-order expansion :meth:`loss` takes (one neuron-sized evaluation)."""
        at = [v.detach().clone().requires_grad_(True) for v in (Gam, gam, X0)]
        value = diagonal_terms(self.loadings(at[0], at[1]), at[2], tensors)
        grads = torch.autograd.grad(value, at)
        return value.detach(), grads, [v.detach() for v in at]

    def point_gradient(self, X: torch.Tensor, tensors: dict) -> torch.Tensor:
        """One pass: the gradient of ``L~`` in ``C`` (N_obs, n, ``by_group`` rows) at the
        point and ``X``; the queued direction's projections, formed in the same read, join
        the basis."""
        with torch.no_grad():
            X = X.detach()
            dZs = self.point_dz(X)
            Q = None if self.queued is None else self.full_loadings(self.queued)[None]
            Pq, gC = self.term.sweep(Q, dZs)
            if self.queued is not None:
                self.add_queued({k: P[0] for k, P in Pq.items()})
            C = self.full_loadings(self.D[0])
            if self.moment_recs:
                gC = gC + self.term.full(C, X, self.moment_recs)[1]
        Cl = C.requires_grad_(True)
        (gmodel,) = torch.autograd.grad(sorted_model_terms(Cl[self.order], X, tensors), Cl)
        return ((gmodel - 2 * gC) / tensors["n_pairs"])[self.order]

    def full_loadings(self, Cs: torch.Tensor) -> torch.Tensor:
        """(N_total, n) from rows in ``by_group`` order (zero for unobserved neurons)."""
        C = Cs.new_zeros((self.term.data.n_neurons, Cs.shape[1]))
        C[self.order] = Cs
        return C

    def point_dz(self, X: torch.Tensor) -> dict[int, torch.Tensor]:
        """``dD/dz`` (rows, G_r, n) at the point, for each data-route recording."""
        out = {}
        for k in self.data_recs:
            _, dZ, _ = window_cross(self.P[k][0], self.term.span_halo(k), X, self.term.w[k])
            out[k] = dZ
        return out

    # -- keeping the basis well conditioned ------------------------------------------------
    def _group_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group sums of a per-row quantity (N_obs,)."""
        G = len(self.bounds)
        return torch.zeros(G, dtype=x.dtype, device=x.device).index_add_(0, self.gid, x)

    def _combine(self, v, Pv, D, P):
        """``v`` (N_obs, n) and its projections ``Pv[k]`` (rows, G_r, n) (None: not formed
        yet) made orthogonal, group by group, to the column space of ``D[0]`` and to each of
        ``D[1:]`` (with projections ``P[k]`` (m+1, ...)), then scaled to ``D[0]``'s norm in
        each group (zero where less than 1e-5 of its norm is left: rounding, not a
        direction)."""
        v = v.clone()
        Pv = None if Pv is None else {k: x.clone() for k, x in Pv.items()}
        n, G = v.shape[1], len(self.bounds)
        slots = {**self.slots, COORDS: torch.arange(G, device=v.device)}
        v0 = self._group_sum((v * v).sum(1))
        Mg = torch.zeros((G, n, n), dtype=v.dtype, device=v.device)
        for g, (a, b) in enumerate(self.bounds):
            A = D[0][a:b]
            gram = A.T @ A
            tr = float(torch.trace(gram))
            if tr > 0:  # (lstsq is not deterministic on CPU; solve is)
                ridge = 1e-12 * tr / n * torch.eye(n, dtype=v.dtype, device=v.device)
                Mg[g] = torch.linalg.solve(gram + ridge, A.T @ v[a:b])
                v[a:b] -= A @ Mg[g]
        if Pv is not None:
            for k in Pv:
                Pv[k] -= torch.einsum("tgn,gnm->tgm", P[k][0], Mg[slots[k]])
        for j, u in enumerate(D[1:]):
            uu, uv = self._group_sum((u * u).sum(1)), self._group_sum((u * v).sum(1))
            c = torch.where(uu > 0, uv / torch.where(uu > 0, uu, 1.0), 0.0)
            v -= c[self.gid, None] * u
            if Pv is not None:
                for k in Pv:
                    Pv[k] -= c[slots[k]][None, :, None] * P[k][j + 1]
        vv, dd = self._group_sum((v * v).sum(1)), self._group_sum((D[0] * D[0]).sum(1))
        keep = (vv > 1e-10 * v0) & (dd > 0)  # what is left is more than rounding
        f = torch.where(keep, torch.sqrt(dd / torch.where(keep, vv, 1.0)), 0.0)
        v *= f[self.gid, None]
        if Pv is not None:
            for k in Pv:
                Pv[k] *= f[slots[k]][None, :, None]
        return v, Pv

    def _rebuild(self, D0, P0, dirs) -> None:
        """The point ``D0`` with projections ``P0`` and the directions ``dirs`` ((v, Pv,
        kind) each), made orthogonal in turn; ``P0`` and each ``Pv`` also hold, under
        ``COORDS``, the vector's coordinates in the old basis ((m+1) n, G, n), which carry
        ``M`` over (:meth:`_transform`)."""
        D, P = [D0], {k: x[None] for k, x in P0.items()}
        kinds = []
        for v, Pv, kind in dirs:
            v, Pv = self._combine(v, Pv, D, P)
            D.append(v)
            P = {k: torch.cat([P[k], Pv[k][None]]) for k in P}
            kinds.append(kind)
        coords = P.pop(COORDS)
        self.D, self.P, self.kinds = D, P, kinds
        if self.queued is not None:
            self.queued, _ = self._combine(self.queued, None, D, P)
        self._layout()
        for k in self.data_recs:
            self.Mflat[k] = self._transform(self.Mflat[k], coords, k)
        self._slot_layout()

    def move(self, Gam: torch.Tensor, gam: torch.Tensor) -> None:
        """Make the point (1) at the coefficients the new ``D_0``: the step from the old one
        becomes a direction (replacing the last step), the last ``MEMORY`` gradients stay,
        and the queued direction is made orthogonal to the new basis."""
        with torch.no_grad():
            n, G = Gam.shape[1], len(self.bounds)
            D0 = self.loadings(Gam, gam)
            c0 = self.stacked(Gam, gam).permute(1, 0, 2)  # coordinates ((m+1) n, G, n)
            eye = torch.eye(c0.shape[0], dtype=c0.dtype, device=c0.device)

            def unit(a: int) -> torch.Tensor:  # the coordinates of D_a
                return eye[:, a * n : (a + 1) * n, None].transpose(1, 2).expand(-1, G, n)

            P0 = {k: self.projections(k, Gam, gam) for k in self.data_recs}
            step = {k: P0[k] - self.P[k][0] for k in self.data_recs}
            P0[COORDS], step[COORDS] = c0, c0 - unit(0)
            grads = [
                (
                    self.D[j + 1],
                    {**{k: self.P[k][j + 1] for k in self.data_recs}, COORDS: unit(j + 1)},
                    kind,
                )
                for j, kind in enumerate(self.kinds)
                if kind == "gradient"
            ][-MEMORY:]
            self._rebuild(D0, P0, [*grads, (D0 - self.D[0], step, "step")])

    def add_queued(self, Pq: dict[int, torch.Tensor]) -> None:
        """The queued direction, whose projections ``Pq[k]`` (rows, G_r, n) a pass has just
        formed, joins the basis (its moments by :meth:`_extend`)."""
        self._extend(Pq)
        self.D.append(self.queued)
        self.kinds.append("gradient")
        self.P = {k: torch.cat([self.P[k], Pq[k][None]]) for k in self.data_recs}
        self.queued = None
        self._layout()
        self._slot_layout()

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (host copies). The projections are this rank's; with
        several ranks they are left out and formed again by one pass on resume."""
        _, world = rank_and_size()
        return {
            "D": [d.cpu() for d in self.D],
            "kinds": list(self.kinds),
            "P": {k: v.cpu() for k, v in self.P.items()} if world == 1 else None,
            "queued": None if self.queued is None else self.queued.cpu(),
        }

    def load(self, state: dict[str, Any]) -> int:
        """Restore :meth:`state`; returns the passes it took (1 when the projections had to
        be formed again)."""
        dev = self.term.data.device
        self.D = [d.to(dev) for d in state["D"]]
        self.kinds = list(state["kinds"])
        self.queued = None if state["queued"] is None else state["queued"].to(dev)
        passes = 0
        if state["P"] is not None:
            self.P = {k: v.to(dev) for k, v in state["P"].items()}
        else:
            Q = torch.stack([self.full_loadings(d) for d in self.D])
            zero = {k: self.term.projection_buffer(k, 1)[0] for k in self.data_recs}
            P, _ = self.term.sweep(Q, zero)
            self.P, passes = P, 1
        self.refresh()
        return passes

    def queue(self, direction: torch.Tensor) -> None:
        """Queue a direction (N_obs, n) for the next pass, orthogonal to the basis."""
        self.queued, _ = self._combine(direction, None, self.D, self.P)


def precondition(grad: torch.Tensor, X: torch.Tensor, basis: Basis, tensors: dict):
    """``grad_g H_g^-1`` for each group (rows of ``grad`` (N_obs, n) in ``by_group`` order):
    ``H_g = sum_s sum_h o_gh(s) (X_s G_h X_s' + X_s' G_h X_s)``, ``G_h = C_h' C_h``, ``o`` the
    co-observed pairs, the Gauss-Newton curvature of the loss in one neuron's loadings with
    every other neuron fixed; a step of 1 along it is the least-squares update of each row
    (alternating least squares, all rows at once)."""
    C = basis.D[0]
    G = torch.stack([C[a:b].T @ C[a:b] for a, b in basis.bounds])
    XGX = torch.einsum("sab,hbc,sdc->shad", X, G, X)  # X_s G_h X_s'
    XtGX = torch.einsum("sba,hbc,scd->shad", X, G, X)  # X_s' G_h X_s
    H = torch.einsum("sgh,shad->gad", tensors["coobserved"], XGX + XtGX)
    n = C.shape[1]
    H = H + 1e-9 * torch.einsum("gaa->g", H)[:, None, None] * torch.eye(n, dtype=H.dtype)
    out = torch.empty_like(grad)
    for g, (a, b) in enumerate(basis.bounds):
        out[a:b] = torch.linalg.solve(H[g], grad[a:b].T).T
    return out


#: The inner solve takes the lag-0 diagonal terms to first order (:meth:`Basis.loss`) when
#: their share of the pairs, ``N_obs / P``, is below this (large recordings: 1e6 neurons
#: give about 1e-7), and exactly otherwise.
LINEAR_DIAGONAL_SHARE = 1e-4


def inner_solve(
    basis: Basis,
    stage_params: list[torch.Tensor],
    make_X: Callable[[], torch.Tensor],
    tensors: dict,
    tol: float,
    scale: float,
) -> tuple[float, torch.Tensor, torch.Tensor, int]:
    """Minimise the loss over (1) and the stage's parameters by L-BFGS, from ``Gamma = I,
    gamma = 0`` (the point) and the stage's parameters as they are, which are left at the best
    point. Returns (loss, Gamma, gamma, evaluations); the loss is exact.

    Where the lag-0 diagonal's share of the pairs is below ``LINEAR_DIAGONAL_SHARE``, the
    solve takes it to first order at the start, so its evaluations touch no neuron-sized
    array; the exact loss is evaluated at the end, and if it differs from the expansion by
    more than ``tol / 100`` times the noise, later solves of this basis are exact."""
    G, n = len(basis.bounds), basis.D[0].shape[1]
    dev = basis.D[0].device
    Gam = torch.eye(n, dtype=torch.float64, device=dev).repeat(G, 1, 1).requires_grad_(True)
    gam = torch.zeros((basis.m, G), dtype=torch.float64, device=dev, requires_grad=True)
    params = [Gam, gam, *stage_params]
    diagonal = None
    if basis.linear_diagonal_ok:
        diagonal = basis.linear_diagonal(Gam, gam, make_X()[0], tensors)
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=INNER_ITERATIONS,
        history_size=20,
        tolerance_grad=0.0,
        tolerance_change=1e-3 * tol,
        line_search_fn="strong_wolfe",
    )
    record: dict[str, Any] = {"evals": 0}

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = basis.loss(Gam, gam, make_X(), tensors, diagonal)
        (loss / scale).backward()
        for q in params:  # contiguous: L-BFGS flattens with view()
            if q.grad is not None:
                q.grad = q.grad.contiguous()
        record["evals"] += 1
        value = float(loss.detach())
        if "best" not in record or value < record["best"]:
            record["best"] = value
            record["state"] = [v.detach().clone() for v in params]
        return loss.detach() / scale

    opt.step(closure)
    Gb, gb, *rest = record["state"]
    with torch.no_grad():
        for p, v in zip(stage_params, rest, strict=True):
            p.copy_(v)
        value = record["best"]
        if diagonal is not None:
            value = float(basis.loss(Gb, gb, make_X(), tensors))
            if abs(value - record["best"]) > 1e-2 * tol * scale:
                log.info(
                    "subspace: the diagonal's expansion is off by %.3g; exact from now",
                    value - record["best"],
                )
                basis.linear_diagonal_ok = False
    return value, Gb, gb, record["evals"]


def subspace(
    params: list[torch.Tensor],
    make_X: Callable[[], torch.Tensor],
    term: DataTerm,
    tensors: dict,
    *,
    stage: str,
    max_passes: int,
    tol: float,
    scale: float,
    trace: list[tuple[str, int, float]],
    carry: dict,
    log_every: int = 5,
    progress=None,
) -> dict[str, Any]:
    """Run one stage by subspace moment matching (module docstring) on ``params``
    (``params[0]`` is ``C``, ``make_X()`` builds ``X`` from the others) and leave them at the
    best point. ``carry`` holds the basis between the stages of one start. Returns the record
    :func:`models._lbfgs` gives, plus ``inner`` (inner evaluations in all) and
    ``pass_seconds`` (the time in passes over the data). With ``progress`` (a checkpointed
    fit, ``models._Progress``) the state is saved before an inner solve when due, and a stage
    started again continues from it on the same path (with several ranks, after one pass
    that forms the projections again)."""
    C = params[0]
    t = time.perf_counter()
    basis: Basis | None = carry.get("basis")
    passes = 0
    pass_seconds = 0.0  # in the passes over the data (the rest is the inner solves)
    loss_start = None
    best: list[float] = []
    inner_evals = 0
    resumed = progress.resume(stage) if progress is not None else None
    if resumed is not None:
        basis = Basis(term, tensors)
        passes = resumed["passes"] + basis.load(resumed["basis"])
        with torch.no_grad():
            for p, v in zip(params, resumed["params"], strict=True):
                p.copy_(v)
        best[:], trace[:] = resumed["best"], resumed["trace"]
        inner_evals, loss_start = resumed["inner"], resumed["loss_start"]
        carry["basis"] = basis
    if basis is None:  # the first pass: the start's projections and gradient in one read
        basis = Basis(term, tensors)
        keep: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            X0 = make_X()
            t_read = time.perf_counter()
            D, gC, dX = term.full(C.detach(), X0.detach(), keep=keep)
            pass_seconds += time.perf_counter() - t_read
        loss0, grad = assemble(C.detach(), X0.detach(), tensors, D, gC, dX)
        passes += 1
        basis.start(C.detach()[basis.order].clone(), keep)
        basis.queue(precondition(grad[basis.order], X0.detach(), basis, tensors))
        loss_start = float(loss0)
        carry["basis"] = basis
    stage_params = params[1:]
    stop = "max_passes"
    while True:
        if progress is not None and progress.saver.due():
            progress.save_stage(
                stage,
                {
                    "params": [p.detach().cpu().clone() for p in params],
                    "basis": basis.state(),
                    "best": list(best),
                    "trace": list(trace),
                    "passes": passes,
                    "inner": inner_evals,
                    "loss_start": loss_start,
                },
            )
        value, Gb, gb, evals = inner_solve(basis, stage_params, make_X, tensors, tol, scale)
        inner_evals += evals
        if loss_start is None:
            loss_start = value
        best.append(min(value, best[-1]) if best else value)
        trace.append((stage, passes, value))
        basis.move(Gb, gb)
        with torch.no_grad():
            C.copy_(basis.full_loadings(basis.D[0]))
        k = len(best)
        if k % log_every == 0:
            log.info(
                "%s: pass %d / at most %d, loss %.6g, %.1f s",
                stage,
                passes,
                max_passes,
                best[-1],
                time.perf_counter() - t,
            )
        if k > WINDOW and best[-1 - WINDOW] - best[-1] <= tol * scale:
            stop = "converged"
            break
        if passes >= max_passes:
            break
        # one pass: the queued direction's projections and the gradient at the new point
        t_read = time.perf_counter()
        with torch.no_grad():
            X = make_X()
        grad = basis.point_gradient(X, tensors)
        pass_seconds += time.perf_counter() - t_read
        passes += 1
        basis.queue(precondition(grad, X, basis, tensors))
    return {
        "optimizer": "subspace",
        "passes": passes,
        "inner": inner_evals,
        "pass_seconds": pass_seconds,
        "stop": stop,
        "converged": stop != "max_passes",
        "loss_start": loss_start,
        "loss": best[-1],
        "seconds": time.perf_counter() - t,
    }
