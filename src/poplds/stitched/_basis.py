"""The basis of subspace moment matching (``_subspace``): the current point, the directions,
their projections and the lagged moments of the projections.

With the observed neurons' rows sorted by group g, a point ``D_0`` and directions
``D_1 .. D_m`` (each (N_obs, n)), loadings are restricted to

    C_g = D_0g Gamma_g + sum_j gamma_jg D_jg,     Gamma_g (n, n), gamma_jg scalars        (1)

and the projections of a data-route recording to

    z_g[t] = Gamma_g' p_0g[t] + sum_j gamma_jg p_jg[t],     p_jg[t] = D_jg' y_g[t]        (2)

with ``p`` stored once per direction. The data term at any coefficients is then a function
of the lagged moments of the stored projections alone (:meth:`Basis.data_term`), so the loss
over (1) is exact without reading the data (:meth:`Basis.loss`). :meth:`Basis.move` makes a
new point of the basis, :meth:`Basis.add_queued` appends a direction whose projections a
pass has just formed; both keep the moments up to date without a pass over the stored
projections.
"""

from __future__ import annotations

from typing import Any

import torch

from .._distributed import all_sum, rank_and_size
from .._logging import get_logger
from ._loss import (
    DataTerm,
    LossTensors,
    diagonal_terms,
    model_square,
    sorted_model_terms,
    window_cross,
)

log = get_logger()

#: Gradient directions kept in the basis (besides the current point and the last step).
MEMORY = 6

#: The inner solve takes the lag-0 diagonal terms to first order (:meth:`Basis.loss`) when
#: their share of the pairs, ``N_obs / P``, is below this (large recordings: 1e6 neurons
#: give about 1e-7), and exactly otherwise.
LINEAR_DIAGONAL_SHARE = 1e-4


class Basis:
    """The current point ``D_0``, the directions ``D_1 .. D_m``, their projections and the
    lagged moments of the projections (module docstring). One object by choice: the
    directions, their projections and the moments change together in :meth:`move`,
    :meth:`add_queued` and :meth:`load`, and each of those leaves all three consistent.

    Rows of the loadings are the observed neurons in ``by_group`` order (``tensors`` from
    :class:`._loss.LossTensors`); ``gid`` is the group of each row. For each data-route
    recording k, ``P[k]`` (m+1, rows, G_r, n) holds the projections of this rank's
    :meth:`._access.DataAccess.projection_rows` and ``M[k]`` their lagged moments
    ``M_s = sum_u p[u] p[u-s]'`` (K, d, d), ``d = (m+1) G_r n``, over the pairs this rank
    counts, summed over ranks, stored as (G_r, K d, (m+1) n) with the columns of each slot
    together: the data term at any coefficients is a function of ``M`` alone.
    """

    def __init__(self, term: DataTerm, tensors: LossTensors) -> None:
        self.term = term
        self.order = tensors.by_group
        self.bounds = tensors.group_bounds
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
        ) < LINEAR_DIAGONAL_SHARE * float(tensors.n_pairs)

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
        self._set_basis(torch.stack([d.T for d in self.D]).reshape(-1, self.D[0].shape[0]))
        self._gram()

    def _set_basis(self, Et: torch.Tensor) -> None:
        """The basis laid side by side, ``Et`` ((m+1) n, N_obs), with ``D`` views of it."""
        n = self.D[0].shape[1]
        self.Et = Et
        self.D = [Et[a * n : (a + 1) * n].T for a in range(Et.shape[0] // n)]

    def _gram(self) -> None:
        """The groups' Gram matrices ``W`` (G, d1, d1): ``E_g' E_g`` of the basis as laid out."""
        parts = torch.split(self.Et, [b - a for a, b in self.bounds], dim=1)
        self.W = torch.stack([Et_g @ Et_g.T for Et_g in parts])

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
        K, R, h = self.term.data.lags, left.shape[0], self.term.access.span_halo(k)
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

    def loss(self, Gam, gam, X, tensors: LossTensors, diagonal=None) -> torch.Tensor:
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
                    d, x = self.term.moments_term(k, Cf, X.detach(), gC)
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
        return (square + diag - 2 * D) / tensors.n_pairs

    def linear_diagonal(self, Gam, gam, X0, tensors: LossTensors):
        """The lag-0 diagonal terms at the coefficients and ``X_0`` and their gradients: the
        first-order expansion :meth:`loss` takes (one neuron-sized evaluation)."""
        at = [v.detach().clone().requires_grad_(True) for v in (Gam, gam, X0)]
        value = diagonal_terms(self.loadings(at[0], at[1]), at[2], tensors)
        grads = torch.autograd.grad(value, at)
        return value.detach(), grads, [v.detach() for v in at]

    def point_gradient(self, X: torch.Tensor, tensors: LossTensors) -> torch.Tensor:
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
        return ((gmodel - 2 * gC) / tensors.n_pairs)[self.order]

    def full_loadings(self, Cs: torch.Tensor) -> torch.Tensor:
        """(N_total, n) from rows in ``by_group`` order (zero for unobserved neurons)."""
        C = Cs.new_zeros((self.term.data.n_neurons, Cs.shape[1]))
        C[self.order] = Cs
        return C

    def point_dz(self, X: torch.Tensor) -> dict[int, torch.Tensor]:
        """``dD/dz`` (rows, G_r, n) at the point, for each data-route recording."""
        out = {}
        for k in self.data_recs:
            _, dZ, _ = window_cross(self.P[k][0], self.term.access.span_halo(k), X, self.term.w[k])
            out[k] = dZ
        return out

    # -- keeping the basis well conditioned ------------------------------------------------
    def _group_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group sums of a per-row quantity (N_obs,)."""
        G = len(self.bounds)
        return torch.zeros(G, dtype=x.dtype, device=x.device).index_add_(0, self.gid, x)

    def _combine(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` (N_obs, n) made orthogonal, group by group, to the column space of ``D_0``
        and to each of ``D_1 .. D_m`` (themselves orthogonal to it and to each other), then
        scaled to ``D_0``'s norm in each group (zero where less than 1e-5 of its norm is
        left: rounding, not a direction). Two rounds of classical Gram-Schmidt, each two
        products per group with the basis laid side by side (``E_g' v_g`` and ``E_g c``)."""
        v = v.clone()
        n = v.shape[1]
        m = self.m
        eye = torch.eye(n, dtype=v.dtype, device=v.device)
        v0 = self._group_sum((v * v).sum(1))
        W = self.W
        dd = torch.einsum("gii->g", W[:, :n, :n])
        cols = torch.arange(n, device=v.device)
        idx = torch.arange(1, m + 1, device=v.device)[:, None] * n + cols  # (m, n): D_j's rows
        uu = W[:, idx, idx].sum(2) if m else None  # (G, m): |D_j|^2 in each group
        for _ in range(2):  # the second round removes what rounding left of the first
            for g, (a, b) in enumerate(self.bounds):
                if b == a:
                    continue
                Eg, vg = self.Et[:, a:b], v[a:b]
                proj = Eg @ vg  # ((m+1) n, n): D_j' v_g
                coef = torch.zeros_like(proj)
                if float(dd[g]) > 0:  # (lstsq is not deterministic on CPU; solve is)
                    ridge = 1e-12 * float(dd[g]) / n * eye
                    coef[:n] = torch.linalg.solve(W[g, :n, :n] + ridge, proj[:n])
                if m:
                    uv = proj[idx, cols].sum(1)
                    u = uu[g]
                    c = torch.where(u > 0, uv / torch.where(u > 0, u, 1.0), 0.0)
                    coef[n:] = (c[:, None, None] * eye).reshape(m * n, n)
                vg -= Eg.T @ coef
        vv = self._group_sum((v * v).sum(1))
        keep = (vv > 1e-10 * v0) & (dd > 0)  # what is left is more than rounding
        f = torch.where(keep, torch.sqrt(dd / torch.where(keep, vv, 1.0)), 0.0)
        v *= f[self.gid, None]
        return v

    def _orthogonal_coords(self, coords: list[torch.Tensor]) -> torch.Tensor:
        """Vectors given by their coordinates in the basis (``coords[b]`` ((m+1) n, G, n),
        ``v_g = E_g coords[b][:, g]``), made orthogonal in turn exactly as :meth:`_combine`
        makes vectors, the first kept as it is: every inner product is ``u' W_g v`` with the
        groups' Gram matrices ``W``, so no neuron-sized array is touched. Returns the new
        coordinates (b, (m+1) n, G, n)."""

        def inner(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # (G, n, n): u_g' v_g
            return torch.einsum("agi,gab,bgj->gij", u, self.W, v)

        def trace(x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("gii->g", x)

        c0 = coords[0]
        n = c0.shape[2]
        gram = inner(c0, c0)
        dd = trace(gram)
        ridge = torch.where(dd > 0, 1e-12 * dd / n, 1.0)[:, None, None] * torch.eye(
            n, dtype=c0.dtype, device=c0.device
        )
        out = [c0]
        for cv in coords[1:]:
            v0 = trace(inner(cv, cv))
            Mg = torch.linalg.solve(gram + ridge, inner(c0, cv))
            Mg = torch.where((dd > 0)[:, None, None], Mg, 0.0)
            cv = cv - torch.einsum("agi,gij->agj", c0, Mg)
            for cu in out[1:]:
                uu, uv = trace(inner(cu, cu)), trace(inner(cu, cv))
                c = torch.where(uu > 0, uv / torch.where(uu > 0, uu, 1.0), 0.0)
                cv = cv - c[None, :, None] * cu
            vv = trace(inner(cv, cv))
            keep = (vv > 1e-10 * v0) & (dd > 0)  # what is left is more than rounding
            f = torch.where(keep, torch.sqrt(dd / torch.where(keep, vv, 1.0)), 0.0)
            out.append(cv * f[None, :, None])
        return torch.stack(out)

    def _rebuild(self, coords: list[torch.Tensor], kinds: list[str]) -> None:
        """A new basis from vectors of the old one given by their coordinates (``coords[0]``
        the new point, then the directions, :meth:`_orthogonal_coords`): the new ``E_g``
        is one product of the old one per group, the projections and their moments follow
        from the coordinates (:meth:`_transform`), and the queued direction is made
        orthogonal to the new basis."""
        T = self._orthogonal_coords(coords)  # (m'+1, (m+1) n, G, n)
        a1, d0, _, n = T.shape
        a0 = d0 // n
        Et = self.Et.new_empty((a1 * n, self.Et.shape[1]))
        for g, (a, b) in enumerate(self.bounds):
            Et[:, a:b] = T[:, :, g].permute(0, 2, 1).reshape(a1 * n, d0) @ self.Et[:, a:b]
        for k in self.data_recs:
            Tk = T[:, :, self.slots[k]].view(a1, a0, n, -1, n)  # (b, a, i, g, j)
            self.P[k] = torch.einsum("atgi,baigj->btgj", self.P[k], Tk)
            self.Mflat[k] = self._transform(self.Mflat[k], T, k)
        # the new Gram matrices from the coordinates, T_g' W_g T_g (no neuron-sized product)
        Tg = T.permute(2, 0, 3, 1).reshape(len(self.bounds), a1 * n, d0)
        self.W = Tg @ self.W @ Tg.transpose(1, 2)
        self._set_basis(Et)
        self.kinds = kinds
        if self.queued is not None:
            self.queued = self._combine(self.queued)
        self._slot_layout()

    def move(self, Gam: torch.Tensor, gam: torch.Tensor) -> None:
        """Make the point (1) at the coefficients the new ``D_0``: the step from the old one
        becomes a direction (replacing the last step), the last ``MEMORY`` gradients stay,
        and the queued direction is made orthogonal to the new basis."""
        with torch.no_grad():
            n, G = Gam.shape[1], len(self.bounds)
            c0 = self.stacked(Gam, gam).permute(1, 0, 2)  # coordinates ((m+1) n, G, n)
            eye = torch.eye(c0.shape[0], dtype=c0.dtype, device=c0.device)

            def unit(a: int) -> torch.Tensor:  # the coordinates of D_a
                return eye[:, a * n : (a + 1) * n, None].transpose(1, 2).expand(-1, G, n)

            grads = [j + 1 for j, kind in enumerate(self.kinds) if kind == "gradient"][-MEMORY:]
            coords = [c0, *(unit(j) for j in grads), c0 - unit(0)]
            self._rebuild(coords, ["gradient"] * len(grads) + ["step"])

    def add_queued(self, Pq: dict[int, torch.Tensor]) -> None:
        """The queued direction, whose projections ``Pq[k]`` (rows, G_r, n) a pass has just
        formed, joins the basis (its moments by :meth:`_extend`)."""
        self._extend(Pq)
        q = self.queued
        # the Gram matrices grow by the new direction's products with the basis (one product
        # per group, not the basis's Gram matrices again)
        parts = zip(self.bounds, self.W, strict=True)
        self.W = torch.stack(
            [self._grown(W, self.Et[:, a:b] @ q[a:b], q[a:b].T @ q[a:b]) for (a, b), W in parts]
        )
        self._set_basis(torch.cat([self.Et, q.T]))
        self.kinds.append("gradient")
        self.P = {k: torch.cat([self.P[k], Pq[k][None]]) for k in self.data_recs}
        self.queued = None
        self._slot_layout()

    @staticmethod
    def _grown(W: torch.Tensor, Eq: torch.Tensor, qq: torch.Tensor) -> torch.Tensor:
        """``[[W, E'q], [q'E, q'q]]``: a Gram matrix with one more block of columns."""
        return torch.cat([torch.cat([W, Eq], 1), torch.cat([Eq.T, qq], 1)], 0)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (host copies): the basis, its projections and their
        moments as kept up to date, so a resumed fit goes on exactly as the uninterrupted one
        would. The projections are this rank's; with several ranks they are left out and
        formed again by one pass on resume (and the moments formed afresh from them)."""
        _, world = rank_and_size()
        alone = world == 1
        return {
            "D": [d.cpu() for d in self.D],
            "kinds": list(self.kinds),
            "P": {k: v.cpu() for k, v in self.P.items()} if alone else None,
            "M": {k: v.cpu() for k, v in self.Mflat.items()} if alone else None,
            "W": self.W.cpu(),  # as carried, not formed again: a resumed fit's path is exact
            "queued": None if self.queued is None else self.queued.cpu(),
            "linear_diagonal_ok": self.linear_diagonal_ok,
        }

    def load(self, state: dict[str, Any]) -> int:
        """Restore :meth:`state`; returns the passes it took (1 when the projections had to
        be formed again)."""
        dev = self.term.data.device
        self.D = [d.to(dev) for d in state["D"]]
        self.kinds = list(state["kinds"])
        self.queued = None if state["queued"] is None else state["queued"].to(dev)
        self.linear_diagonal_ok = state["linear_diagonal_ok"]
        if state["P"] is not None:
            self.P = {k: v.to(dev) for k, v in state["P"].items()}
            self.Mflat = {k: v.to(dev) for k, v in state["M"].items()}
            self._layout()
            if state.get("W") is not None:  # (a checkpoint of an older release has none)
                self.W = state["W"].to(dev)
            self._slot_layout()
            return 0
        Q = torch.stack([self.full_loadings(d) for d in self.D])
        zero = {k: self.term.projection_buffer(k, 1)[0] for k in self.data_recs}
        self.P, _ = self.term.sweep(Q, zero)
        self.refresh()
        return 1

    def queue(self, direction: torch.Tensor) -> None:
        """Queue a direction (N_obs, n) for the next pass, orthogonal to the basis."""
        self.queued = self._combine(direction)
