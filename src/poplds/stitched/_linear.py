"""Bootstrap replicates of a stitched fit by one Gauss-Newton step from the estimate.

Where refitting every replicate is out of reach (recordings whose per-atom lagged sums do not
fit in memory), replicate b's estimate is the Gauss-Newton step from the point estimate
``theta^ = (C, A, L)`` (the refits' parameters, ``Pi = unit L L'``):

    theta_b = theta^ - H^-1 (g_b - g_0),      H = (2/P) J'J

with ``g_b`` the gradient of the reduced loss (``_loss``) at ``theta^`` on replicate b's data and
``g_0`` on the data themselves (their difference cancels whatever the point fit left of its
own gradient), and ``J`` the Jacobian of the model covariances ``M_s(i, j) = C_i X_s C_j'`` over
the loss's pairs. ``J'J`` needs no data: it is the Hessian at ``theta^`` of

    L_m(theta) = (1/P) sum_(s, i~j, not lag-0 diagonal) (M_s(i, j; theta) - M_s(i, j; theta^))^2
               = (1/P) [ sum_s sum_(g~h) tr(X_s' G_g X_s G_h) - 2 tr(X_s' F_g X^_s F_h')
                         - sum_i (m_i - m^_i)^2 ] + const,
    G_g = C_g' C_g,  F_g = C_g' C^_g,  m_i = C_i X_0 C_i',

whose residuals vanish at ``theta^``, so its Hessian there is ``(2/P) J'J`` exactly. The steps
of all replicates are solved together by conjugate gradients on Hessian-vector products of
``L_m`` (double back-propagation; every replicate its own step sizes). ``H`` is singular
along the model's invariances (``C -> C T``); the gradients are orthogonal to them, and CG
from zero stays in H's range.

The gradient differences are linear in the replicate's data: in ``C``, ``-(2/P) (dD_b/dC -
dD_0/dC)`` with ``dD/dC_r = sum_s S~_rs C X_s' + S~_rs' C X_s``; in ``X_s``, ``-(2/P) C'(S~_bs -
S~_0s) C``; and the lag-0 diagonal's ``(2/P) (d_b - d_0)`` terms, with ``d`` the variances
(:func:`projected_gradients`, from the stored projections and one more pass, ``_projected``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ._data import StitchedData
from ._loss import LossTensors
from ._refit import lagged_latents, replicate_params
from .models import StitchedLDSParams

#: CG stops when every replicate's residual is below this share of its right-hand side.
CG_TOL = 1e-4

#: CG's cap on Hessian-vector products.
CG_MAX = 300


class GaussNewton:
    """The Gauss-Newton system at a point estimate ``start`` of ``data`` (module docstring),
    for ``B`` right-hand sides at once."""

    def __init__(self, data: StitchedData, start: StitchedLDSParams, B: int) -> None:
        dev = data.device
        self.data, self.B, self.K = data, B, data.lags
        self.tensors = t = LossTensors.of(data, dev)
        obs = data.group_of >= 0
        self.unit = float(np.nanmean(data.variance[obs]))
        C = torch.as_tensor(np.nan_to_num(start.C), device=dev)
        A = torch.as_tensor(start.A, device=dev)
        L = torch.linalg.cholesky(torch.as_tensor(start.Pi, device=dev) / self.unit)
        self.theta = [C, A, L]
        self.Cs0 = C[t.by_group]
        with torch.no_grad():
            self.X0 = self.X(A[None], L[None])[0]
            self.m0 = torch.sum((self.Cs0 @ self.X0[0]) * self.Cs0, dim=1)

    def X(self, A: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        """(B, K, n, n): ``X_bs = A_b^s Pi_b`` (``_refit.lagged_latents``)."""
        return lagged_latents(A, L, self.unit, self.K)

    def _gram(self, P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        """(B, G, n, n): ``P_g' Q_g`` per group of the rows (B, N_obs, n) in group order."""
        return torch.stack(
            [P[:, a:b].transpose(1, 2) @ Q[:, a:b] for a, b in self.tensors.group_bounds], dim=1
        )

    def model_loss(self, C: torch.Tensor, A: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        """``P sum_b L_m(theta_b)`` up to a constant (module docstring); differentiable twice."""
        t = self.tensors
        B = C.shape[0]
        X = self.X(A, L)
        Cs = C[:, t.by_group]
        G = self._gram(Cs, Cs)
        F = self._gram(Cs, self.Cs0.expand(B, -1, -1))
        co = t.coobserved
        XtGX = X.transpose(2, 3)[:, :, None] @ G[:, None] @ X[:, :, None]  # (B, K, G, n, n)
        square = torch.einsum("bsgij,bhij,sgh->b", XtGX, G, co)
        XtFX = X.transpose(2, 3)[:, :, None] @ F[:, None] @ self.X0[None, :, None]
        cross = torch.einsum("bsgij,bhij,sgh->b", XtFX, F, co)
        m = torch.sum((Cs @ X[:, 0]) * Cs, dim=2)
        return torch.sum(square - 2 * cross - torch.sum((m - self.m0) ** 2, dim=1))

    def hvp(self, V: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``P/2 H v`` = ``J'J v`` for every replicate's direction ``V`` = (dC (B, N, n),
        dA (B, n, n), dL (B, n, n))."""
        params = [p.expand(self.B, *p.shape).clone().requires_grad_(True) for p in self.theta]
        loss = self.model_loss(*params)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum(torch.sum(g * v) for g, v in zip(grads, V, strict=True))
        return [h.detach() / 2 for h in torch.autograd.grad(dot, params)]

    def solve(self, rhs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], int, float]:
        """``x_b = (J'J)^+ rhs_b`` for every replicate by conjugate gradients (batched, each
        its own step sizes). Returns ``(x, products, worst relative residual)``."""

        def dot(u: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> torch.Tensor:
            return sum(
                torch.sum((a * b).reshape(self.B, -1), dim=1) for a, b in zip(u, v, strict=True)
            )

        def bc(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return c.reshape((-1,) + (1,) * (like.dim() - 1))

        x = [torch.zeros_like(r) for r in rhs]
        r = [v.clone() for v in rhs]
        p = [v.clone() for v in rhs]
        rr = dot(r, r)
        norm = torch.sqrt(rr).clamp_min(1e-300)
        products = 0
        for _ in range(CG_MAX):
            Hp = self.hvp(p)
            products += 1
            pHp = dot(p, Hp)
            alpha = torch.where(pHp > 0, rr / pHp.clamp_min(1e-300), torch.zeros_like(rr))
            x = [a + bc(alpha, a) * b for a, b in zip(x, p, strict=True)]
            r = [a - bc(alpha, a) * b for a, b in zip(r, Hp, strict=True)]
            rr_new = dot(r, r)
            if torch.all(torch.sqrt(rr_new) <= CG_TOL * norm):
                rr = rr_new
                break
            beta = rr_new / rr.clamp_min(1e-300)
            p = [a + bc(beta, b) * b for a, b in zip(r, p, strict=True)]
            rr = rr_new
        return x, products, float(torch.max(torch.sqrt(rr) / norm))

    def x_gradient(self, dX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients in ``(A, L)`` (B, n, n) of a gradient ``dX`` (B, K, n, n) in ``X``."""
        A, L = (p.expand(self.B, *p.shape).clone().requires_grad_(True) for p in self.theta[1:])
        gA, gL = torch.autograd.grad(self.X(A, L), (A, L), grad_outputs=dX)
        return gA, gL

    def steps(
        self, dC: torch.Tensor, dX: torch.Tensor
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], int, float]:
        """Every replicate's ``(C, A, Pi)`` from its gradient difference ``g_b - g_0`` of the
        reduced loss ``L~`` in ``C`` (B, N, n) and ``X`` (B, K, n, n): ``theta_b = theta^ -
        (P/2) (J'J)^+ (g_b - g_0)``. Returns (parameters, CG products, worst residual)."""
        gA, gL = self.x_gradient(dX)
        h = -float(self.tensors.n_pairs) / 2
        x, products, residual = self.solve([h * dC, h * gA, h * gL])
        C, A, L = (p[None] + d for p, d in zip(self.theta, x, strict=True))
        with torch.no_grad():
            Pi = lagged_latents(A, L, self.unit, 1)[:, 0]
        return [(C[b], A[b], Pi[b]) for b in range(self.B)], products, residual


def diag_gradient(gn: GaussNewton, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lag-0 diagonal term's gradient (of ``P L~``) at the estimate for variances ``V``
    (B, N_total): ``dm_i = 2 (v_i - m_i) + 2 max(0, m_i - v_i)``, in ``C`` (B, N, n)
    ``dm_i C_i (X_0 + X_0')`` and in ``X_0`` ``sum_i dm_i C_i' C_i`` (B, K, n, n)."""
    t = gn.tensors
    Cs, X0 = gn.Cs0, gn.X0[0]
    v = torch.nan_to_num(V[:, t.by_group])
    dm = 2 * (v - gn.m0) + 2 * torch.clamp(gn.m0 - v, min=0)  # (B, N_obs)
    dC = torch.zeros((V.shape[0], *gn.theta[0].shape), dtype=torch.float64, device=V.device)
    dC[:, t.by_group] = dm[:, :, None] * (Cs @ (X0 + X0.T))[None]
    dX = torch.zeros((V.shape[0], *gn.X0.shape), dtype=torch.float64, device=V.device)
    dX[:, 0] = torch.einsum("bi,ia,ic->bac", dm, Cs, Cs)
    return dC, dX


def projected_gradients(
    data: StitchedData,
    start: StitchedLDSParams,
    dD_dC: torch.Tensor,
    CSC: torch.Tensor,
    variances: np.ndarray,
) -> tuple[GaussNewton, torch.Tensor, torch.Tensor]:
    """The replicates' gradient differences ``g_b - g_0`` of ``L~`` at the estimate in ``C``
    (B, N, n) and ``X`` (B, K, n, n), from the data terms of ``_projected.replicate_data``
    (row 0 the data's own): the gradient of ``P L~`` is the diagonal term's
    (:func:`diag_gradient`) minus twice the data term's (the model's own terms cancel in the
    difference)."""
    B = dD_dC.shape[0] - 1
    gn = GaussNewton(data, start, B)
    V = torch.as_tensor(variances, device=dD_dC.device)
    dC_diag, dX_diag = diag_gradient(gn, V)
    dC = dC_diag - 2 * dD_dC
    dX = dX_diag - 2 * CSC
    P = float(gn.tensors.n_pairs)
    return gn, (dC[1:] - dC[0]) / P, (dX[1:] - dX[0]) / P


def projected_replicates(
    data: StitchedData,
    start: StitchedLDSParams,
    dD_dC: torch.Tensor,
    CSC: torch.Tensor,
    variances: np.ndarray,
) -> tuple[list[StitchedLDSParams], int, float]:
    """The replicates' parameters by one Gauss-Newton step each, from the data terms of
    ``_projected.replicate_data`` (:func:`projected_gradients`). Returns (parameters, CG
    products, worst residual)."""
    gn, dC, dX = projected_gradients(data, start, dD_dC, CSC, variances)
    steps, products, residual = gn.steps(dC, dX)
    return replicate_params(data, steps, list(variances[1:])), products, residual
