"""Refits of many nearly equal problems at once: the bootstrap replicates of one fit.

Replicate b has its own lagged sums ``S_br`` (each recording r) and variances ``v_b``, and its
own parameters ``C_b`` (N, n), ``A_b``, ``Pi_b = L_b L_b'`` started at the fit's. Its loss is the
fit's linked-stage loss (``_loss``, moments route) on its own sums:

    P L_b = sum_s sum_(g~h) tr(X_bs' G_bg X_bs G_bh) - 2 sum_r sum_s < w o S_brs, C_br X_bs C_br' >
            - sum_i (m_bi^2 - 2 m_bi d_bi) + sum_i max(0, m_bi - v_bi)^2,   X_bs = A_b^s Pi_b

The replicates are independent, so ``sum_b L_b`` is minimised by one L-BFGS run over all their
parameters (the stage loop, ``_stage.run_stage``, with this sum as its objective): every
evaluation is a handful of batched products instead of B separate passes, which on small
problems (where a pass is mostly fixed overhead) is nearly B times cheaper. The convergence
test is the stage's, on the sum, with the noise scale of B replicates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from ._data import StitchedData
from ._loss import LossTensors, expand_groups
from ._optimizers import registry
from ._stage import StageProblem, StageRecord, run_stage
from .models import StitchedLDSParams, _noise_and_guards

#: The type of the replicates' weighted sums and of their products with C.
PRODUCT_DTYPE = torch.float32


class ReplicateLoss:
    """The replicates' losses (module docstring) as a function of their parameters.

    ``moments[b]``: replicate b's unweighted lagged sums of every recording (K, N_r, N_r),
    group-sorted; ``variances[b]``: its variances (N_total,). Calling it with ``C``
    (B, N, n) and ``X`` (B, K, n, n) returns the (B,) reduced losses ``L_b``
    (``P L_b`` over the pairs ``P`` of the loss)."""

    def __init__(
        self,
        data: StitchedData,
        moments: Sequence[Sequence[torch.Tensor]],
        variances: Sequence[np.ndarray],
    ) -> None:
        dev = data.device
        self.tensors = LossTensors.of(data, dev)
        w = data.weights(dev)
        self.S, self.index = [], []
        for k, rec in enumerate(data.recordings):
            g = torch.as_tensor(rec.groups, device=dev)
            E = expand_groups(rec, w[:, g][:, :, g])
            self.S.append(torch.stack([(m[k].to(dev) * E).to(PRODUCT_DTYPE) for m in moments]))
            self.index.append(torch.as_tensor(rec.neurons, device=dev))
        V = torch.as_tensor(np.stack(variances), device=dev)[:, self.tensors.by_group]
        self.V = torch.nan_to_num(V)
        bounds = self.tensors.group_bounds
        group = torch.repeat_interleave(
            torch.arange(len(bounds), device=dev),
            torch.as_tensor([b - a for a, b in bounds], device=dev),
        )
        self.onehot = torch.nn.functional.one_hot(group, len(bounds)).to(torch.float64)

    def __call__(self, C: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        B, K, n = X.shape[0], X.shape[1], X.shape[2]
        Cs = C[:, t.by_group]
        outer = (Cs[:, :, :, None] * Cs[:, :, None, :]).reshape(B, -1, n * n)
        G = (self.onehot.T @ outer).reshape(B, -1, n, n)  # (B, G, n, n): C_bg' C_bg
        ng = G.shape[1]
        XtGX = X.transpose(2, 3)[:, :, None] @ G[:, None] @ X[:, :, None]  # (B, K, G, n, n)
        # tr(X_s' G_g X_s G_h) = <X_s' G_g X_s, G_h'> for every (s, g, h): one batched product
        T = XtGX.reshape(B, K * ng, n * n) @ G.transpose(2, 3).reshape(B, ng, n * n).transpose(1, 2)
        square = torch.sum(T.reshape(B, K, ng, ng) * t.coobserved, dim=(1, 2, 3))
        m = torch.sum((Cs @ X[:, 0]) * Cs, dim=2)
        diag = -torch.sum(m * m - 2 * m * self.V, dim=1) + torch.sum(
            torch.clamp(m - self.V, min=0) ** 2, dim=1
        )
        D = C.new_zeros(B)
        for Sr, idx in zip(self.S, self.index, strict=True):
            Cr = C[:, idx]
            SC = (Sr @ Cr[:, None].to(Sr.dtype)).to(C.dtype)  # (B, K, N_r, n): S_s C
            D = D + torch.sum((Cr[:, None] @ X) * SC, dim=(1, 2, 3))  # sum_s <C X_s, S_s C>
        return (square + diag - 2 * D) / t.n_pairs


def batched_refit(
    data: StitchedData,
    moments: Sequence[Sequence[torch.Tensor]],
    variances: Sequence[np.ndarray],
    start: StitchedLDSParams,
    *,
    tol: float,
    window: int,
    max_passes: int,
    seed: int = 0,
) -> tuple[list[StitchedLDSParams], StageRecord]:
    """Refit every replicate b (``moments[b]``: each recording's unweighted lagged sums,
    ``variances[b]``: (N_total,)) from ``start``. Returns their parameters and the stage's
    record (passes, stop)."""
    dev = data.device
    B, K = len(moments), data.lags
    loss_of = ReplicateLoss(data, moments, variances)
    unit = float(np.nanmean(np.stack(variances)[:, data.group_of >= 0]))
    C = torch.as_tensor(np.nan_to_num(start.C), device=dev).expand(B, -1, -1).clone()
    A = torch.as_tensor(start.A, device=dev).expand(B, -1, -1).clone()
    L0 = torch.linalg.cholesky(torch.as_tensor(start.Pi, device=dev) / unit)
    L = L0.expand(B, -1, -1).clone()
    for p in (C, A, L):
        p.requires_grad_(True)

    def make_X() -> torch.Tensor:  # (B, K, n, n): X_bs = A_b^s Pi_b, batched over b
        Lt = torch.tril(L)
        out = [unit * Lt @ Lt.transpose(1, 2)]
        for _ in range(1, K):
            out.append(A @ out[-1])
        return torch.stack(out, dim=1)

    def objective() -> torch.Tensor:
        for p in (C, A, L):
            p.grad = None
        loss = torch.sum(loss_of(C, make_X()))
        loss.backward()
        return loss.detach()

    problem = StageProblem(
        stage="refit",
        params=[C, A, L],
        make_X=make_X,
        term=None,
        tensors=loss_of.tensors,
        tol=tol,
        scale=B * data.noise_floor(),
        seed=seed,
        objective=objective,
    )
    spec = dataclasses.replace(registry()["lbfgs"], window=window)
    record = run_stage(spec, spec.options(max_passes=max_passes), problem, [], {}, None)
    with torch.no_grad():
        Lt = torch.tril(L)
        Pi = unit * Lt @ Lt.transpose(1, 2)
    out = []
    for b in range(B):
        d = dataclasses.replace(data, variance=variances[b], diag0=variances[b])
        params, _ = _noise_and_guards(d, C[b].detach(), A[b].detach(), Pi[b], K)
        out.append(params)
    return out, record


def replicate_groups(B: int, per_replicate_bytes: float, budget: float) -> list[range]:
    """Replicates in groups whose stacked sums fit in ``budget`` bytes."""
    size = max(1, min(B, int(budget // max(per_replicate_bytes, 1.0))))
    return [range(a, min(B, a + size)) for a in range(0, B, size)]
