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


#: Recordings are padded to one size and stacked (fewer, larger products) while the padding
#: adds at most this share to their sums' size.
PAD_SHARE = 0.25


def _stacked(sizes: Sequence[int]) -> bool:
    """Whether recordings of ``sizes`` neurons are padded into one block (``PAD_SHARE``)."""
    top = max(sizes, default=0)
    return len(sizes) > 1 and len(sizes) * top**2 <= (1 + PAD_SHARE) * sum(n * n for n in sizes)


def replicate_bytes(data: StitchedData) -> float:
    """Bytes one replicate's weighted sums take in a :class:`ReplicateLoss` (blocks, padding
    included, in ``PRODUCT_DTYPE``)."""
    sizes = [len(r.neurons) for r in data.recordings]
    pairs = len(sizes) * max(sizes) ** 2 if _stacked(sizes) else sum(n * n for n in sizes)
    return float(torch.finfo(PRODUCT_DTYPE).bits // 8 * data.lags * pairs)


def _layout(data: StitchedData, B: int) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Empty blocks ``(S (B, R, N_b, K, N_b), index (R, N_b), recordings)`` for the
    recordings' weighted sums, ``S[b, r, i, s, j] = S~_rs(i, j)`` (rows, then lags: ``S_s C``
    and ``C' S_s`` of every lag are then one product each): all recordings in one block,
    zero-padded to the largest (index ``N_total``, a zero row of C, in the padding) where
    that adds at most :data:`PAD_SHARE`; else one block per recording."""
    N, K, dev = data.n_neurons, data.lags, data.device
    sizes = [len(r.neurons) for r in data.recordings]
    groups = [list(range(len(sizes)))] if _stacked(sizes) else [[k] for k in range(len(sizes))]
    out = []
    for members in groups:
        top = max(sizes[k] for k in members)
        S = torch.zeros((B, len(members), top, K, top), dtype=PRODUCT_DTYPE, device=dev)
        index = torch.full((len(members), top), N, dtype=torch.long, device=dev)
        for r, k in enumerate(members):
            index[r, : sizes[k]] = torch.as_tensor(data.recordings[k].neurons, device=dev)
        out.append((S, index, members))
    return out


class ReplicateLoss:
    """The replicates' losses (module docstring) as a function of their parameters.

    ``moments[b]``: replicate b's unweighted lagged sums of every recording (K, N_r, N_r),
    group-sorted; ``variances[b]``: its variances (N_total,). Calling it with ``C``
    (B, N, n) and ``X`` (B, K, n, n) returns the (B,) reduced losses ``L_b``
    (``P L_b`` over the pairs ``P`` of the loss)."""

    def __init__(
        self,
        data: StitchedData,
        moments: Sequence[Sequence[torch.Tensor]] = (),
        variances: Sequence[np.ndarray] = (),
        size: int | None = None,
    ) -> None:
        """From every replicate's sums and variances, or empty for ``size`` replicates that
        :meth:`set` fills one by one (one replicate's float64 sums at a time in memory)."""
        dev = data.device
        self.data = data
        self.tensors = LossTensors.of(data, dev)
        B = len(moments) if size is None else size
        w = data.weights(dev)
        self._expand = []
        for rec in data.recordings:
            g = torch.as_tensor(rec.groups, device=dev)
            self._expand.append(expand_groups(rec, w[:, g][:, :, g]))
        layout = _layout(data, B)
        self._members = [m for _, _, m in layout]
        self.blocks = [(S, index) for S, index, _ in layout]
        self.V = torch.zeros((B, len(self.tensors.by_group)), dtype=torch.float64, device=dev)
        bounds = self.tensors.group_bounds
        group = torch.repeat_interleave(
            torch.arange(len(bounds), device=dev),
            torch.as_tensor([b - a for a, b in bounds], device=dev),
        )
        self.group = group  # (N_obs,): each row's group, in by_group order
        self.onehot = torch.nn.functional.one_hot(group, len(bounds)).to(torch.float64)
        for b, (m, v) in enumerate(zip(moments, variances, strict=True)):
            self.set(b, m, v)

    def set(self, b: int, moments: Sequence[torch.Tensor], variance: np.ndarray) -> None:
        """Replicate b's unweighted lagged sums of every recording (K, N_r, N_r) and its
        variances (N_total,)."""
        dev = self.data.device
        for (S, _), members in zip(self.blocks, self._members, strict=True):
            for r, k in enumerate(members):
                n_r = len(self.data.recordings[k].neurons)
                W = (moments[k].to(dev) * self._expand[k]).to(S.dtype)  # (K, N_r, N_r)
                S[b, r, :n_r, :, :n_r] = W.transpose(0, 1)
        v = torch.as_tensor(variance, device=dev)[self.tensors.by_group]
        self.V[b] = torch.nan_to_num(v)

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
        C0 = torch.cat([C, C.new_zeros(B, 1, n)], dim=1)  # a zero row for the padding
        for Sr, idx in self.blocks:
            Cr = C0[:, idx]  # (B, R, N_b, n)
            R, Nb = idx.shape
            SC = (Sr.reshape(B, R, Nb * K, Nb) @ Cr.to(Sr.dtype)).to(C.dtype)
            SC = SC.reshape(B, R, Nb, K, n).transpose(2, 3)  # (B, R, K, N_b, n): S_s C
            CX = Cr[:, :, None] @ X[:, None]
            D = D + torch.sum(CX * SC, dim=(1, 2, 3, 4))  # sum_s <C X_s, S_s C>
        return (square + diag - 2 * D) / t.n_pairs

    def value_and_grad(
        self, C: torch.Tensor, X: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(L (B,), dL/dC (B, N, n), dL/dX (B, K, n, n))`` of the summed loss ``sum_b L_b``,
        by hand (no graph; the same value as calling it). With ``H_sg = sum_h o_sgh G_h``,
        ``H'_sg = sum_h o_shg G_h`` (``o`` the co-observed groups) and ``m_i = C_i X_0 C_i'``:

            d square / dX_s = 2 sum_g G_g X_s H_sg
            d square / dG_g = sum_s X_s H_sg X_s' + X_s' H'_sg X_s,  dC_i = 2 C_i dG_g(i)
            d diag / dm_i  = 2 (v_i - m_i) + 2 max(0, m_i - v_i)
            d D / dX_s     = sum_r C_r' S_rs C_r,  dD / dC_r = sum_s S_rs C_r X_s' + S_rs' C_r X_s

        About half the work of autograd's backward on the batched shapes (and none of its
        per-operation overhead, which dominates small problems)."""
        t = self.tensors
        B, K, n = X.shape[0], X.shape[1], X.shape[2]
        co = t.coobserved
        Cs = C[:, t.by_group]
        outer = (Cs[:, :, :, None] * Cs[:, :, None, :]).reshape(B, -1, n * n)
        G = (self.onehot.T @ outer).reshape(B, -1, n, n)  # (B, G, n, n)
        square, dX, dG = _square_terms(G, X, co)
        dCs = 2 * (Cs[:, :, None] @ dG[:, self.group]).squeeze(2)  # (B, N_obs, n)
        CX0 = Cs @ X[:, 0]
        m = torch.sum(CX0 * Cs, dim=2)
        diag = -torch.sum(m * m - 2 * m * self.V, dim=1) + torch.sum(
            torch.clamp(m - self.V, min=0) ** 2, dim=1
        )
        dm = 2 * (self.V - m) + 2 * torch.clamp(m - self.V, min=0)
        dCs = dCs + dm[:, :, None] * (CX0 + Cs @ X[:, 0].transpose(1, 2))
        dX[:, 0] += Cs.transpose(1, 2) @ (dm[:, :, None] * Cs)
        N = C.shape[1]
        dC = C.new_zeros(B, N + 1, n)  # and a row for the padding
        dC.index_add_(1, t.by_group, dCs)
        D = C.new_zeros(B)
        C0 = torch.cat([C, C.new_zeros(B, 1, n)], dim=1)
        # X_s' stacked by rows (s, a) and X_s by rows (a, s): the right sides of dD/dC
        Xt_rows = X.transpose(2, 3).reshape(B, 1, K * n, n)  # [(s, a), c] = X_s[c, a]
        X_rows = X.permute(0, 2, 1, 3).reshape(B, 1, n * K, n)  # [(a, s), c] = X_s[a, c]
        for Sr, idx in self.blocks:
            Cr = C0[:, idx]  # (B, R, N_b, n)
            R, Nb = idx.shape
            C32 = Cr.to(Sr.dtype)
            # S_s C of every lag, rows (i, s); and C' S_s, rows (a, s): S read once each
            SC = (Sr.reshape(B, R, Nb * K, Nb) @ C32).to(C.dtype).reshape(B, R, Nb, K * n)
            CS = (C32.transpose(2, 3) @ Sr.reshape(B, R, Nb, K * Nb)).to(C.dtype)
            CS = CS.reshape(B, R, n * K, Nb)  # [(a, s), j] = (C' S_s)[a, j]
            # C' S_s C (B, K, n, n), summed over the block's recordings
            CSC = (Cr.transpose(2, 3) @ SC).reshape(B, R, n, K, n).sum(1).transpose(1, 2)
            D = D + torch.sum(X * CSC, dim=(1, 2, 3))  # sum_s <X_s, C' S_s C>
            dX -= 2 * CSC
            # dD/dC_r = sum_s S_s C X_s' + (C' S_s)' X_s
            dCr = SC @ Xt_rows + CS.transpose(2, 3) @ X_rows
            dC.index_add_(1, idx.reshape(-1), -2 * dCr.reshape(B, R * Nb, n))
        dC = dC[:, :N]
        P = t.n_pairs
        return (square + diag - 2 * D) / P, dC / P, dX / P


#: Up to this latent dimension the model's square term is formed through ``X_s (x) X_s``
#: (n^2, n^2) per replicate and lag: a few larger products in place of many n-by-n ones
#: (measured faster at n <= 4; slower from n = 5, several times at n = 10).
KRON_MAX_DIM = 4


def _square_terms(
    G: torch.Tensor, X: torch.Tensor, co: torch.Tensor, kron: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``square_b = sum_(s,g,h) o_sgh tr(X_bs' G_bg X_bs G_bh)`` (B,) with its gradients in
    ``X`` (B, K, n, n) and in the (symmetric) ``G`` (B, G, n, n); ``co`` = o (K, G, G).

    ``kron`` (default: n <= :data:`KRON_MAX_DIM`): with ``vec`` row-major, ``vec(X G X') =
    (X (x) X) vec(G)``, so ``T_s = Gm (X_s (x) X_s)' Gm'`` (Gm: the rows ``vec(G_g)``),
    ``dGm = sum_s o_s Y_s + o_s' Z_s`` (``Y_s``, ``Z_s``: rows ``vec(X_s G_h X_s')``,
    ``vec(X_s' G_h X_s)``), ``d/d(X_s (x) X_s) = Gm' o_s Gm``. Else with ``H_sg = sum_h
    o_sgh G_h``, ``H'_sg = sum_h o_shg G_h``: ``dX_s = 2 sum_g G_g X_s H_sg``, ``dG_g =
    sum_s X_s H_sg X_s' + X_s' H'_sg X_s``."""
    B, K, n = X.shape[0], X.shape[1], X.shape[2]
    ng = G.shape[1]
    if kron if kron is not None else n <= KRON_MAX_DIM:
        Kx = (X[:, :, :, None, :, None] * X[:, :, None, :, None, :]).reshape(B, K, n * n, n * n)
        Gm = G.reshape(B, 1, ng, n * n)
        Y = Gm @ Kx.transpose(2, 3)  # (B, K, G, n^2): vec(X_s G_h X_s')
        Z = Gm @ Kx  # vec(X_s' G_h X_s)
        T = Gm @ Y.transpose(2, 3)  # (B, K, G, G): tr(X_s' G_g X_s G_h)
        square = torch.sum(T * co, dim=(1, 2, 3))
        dG = torch.sum(co @ Y + co.transpose(1, 2) @ Z, dim=1).reshape(B, ng, n, n)
        dK = (Gm.transpose(2, 3) @ co @ Gm).reshape(B, K, n, n, n, n)  # [i, k, j, l]
        dX = torch.einsum("zsikjl,zskl->zsij", dK, X) + torch.einsum("zsaicj,zsac->zsij", dK, X)
        return square, dX, dG
    Gf = G.reshape(B, 1, ng, n * n)
    H1 = (co[None] @ Gf).reshape(B, K, ng, n, n)  # (B, K, G, n, n): sum_h o_sgh G_h
    H2 = (co.transpose(1, 2)[None] @ Gf).reshape(B, K, ng, n, n)
    Xg = X[:, :, None]  # (B, K, 1, n, n)
    XtGX = Xg.transpose(3, 4) @ G[:, None] @ Xg  # (B, K, G, n, n): X_s' G_g X_s
    square = torch.sum(XtGX * H1.transpose(3, 4), dim=(1, 2, 3, 4))
    dX = 2 * torch.sum(G[:, None] @ Xg @ H1, dim=2)
    dG = torch.sum(Xg @ H1 @ Xg.transpose(3, 4) + Xg.transpose(3, 4) @ H2 @ Xg, dim=1)
    return square, dX, dG


@dataclasses.dataclass(frozen=True)
class RefitPart:
    """Replicates of one problem: ``data`` (its neurons and pairs), ``loss`` (their
    :class:`ReplicateLoss`), ``variances[b]`` (N_total,) of replicate b, all started from
    ``start``."""

    data: StitchedData
    loss: ReplicateLoss
    variances: Sequence[np.ndarray]
    start: StitchedLDSParams


class _PartParams:
    """One part's batched parameters ``C`` (B, N, n), ``A`` (B, n, n), ``L`` (B, n, n)
    (``Pi_b = unit L_b L_b'``, ``unit`` the part's mean variance) and its loss."""

    def __init__(self, part: RefitPart) -> None:
        data, start = part.data, part.start
        dev, B = data.device, len(part.variances)
        self.part, self.K = part, data.lags
        self.loss_of = part.loss
        self.unit = float(np.nanmean(np.stack(part.variances)[:, data.group_of >= 0]))
        self.C = torch.as_tensor(np.nan_to_num(start.C), device=dev).expand(B, -1, -1).clone()
        self.A = torch.as_tensor(start.A, device=dev).expand(B, -1, -1).clone()
        L0 = torch.linalg.cholesky(torch.as_tensor(start.Pi, device=dev) / self.unit)
        self.L = L0.expand(B, -1, -1).clone()
        for p in self.params:
            p.requires_grad_(True)

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.C, self.A, self.L]

    def X(self) -> torch.Tensor:
        """(B, K, n, n): ``X_bs = A_b^s Pi_b``, batched over b."""
        return lagged_latents(self.A, self.L, self.unit, self.K)

    def evaluate(self) -> torch.Tensor:
        """``sum_b L_b``, with the gradients of ``C``, ``A`` and ``L`` set (``C``'s and
        ``X``'s by hand, ``A``'s and ``L``'s through ``X``'s small graph)."""
        for p in self.params:
            p.grad = None
        X = self.X()
        loss, dC, dX = self.loss_of.value_and_grad(self.C.detach(), X.detach())
        self.C.grad = dC
        X.backward(dX)
        return torch.sum(loss)

    def results(self) -> list[StitchedLDSParams]:
        with torch.no_grad():
            Pi = lagged_latents(self.A, self.L, self.unit, 1)[:, 0]
        steps = [(self.C[b].detach(), self.A[b].detach(), Pi[b]) for b in range(Pi.shape[0])]
        return replicate_params(self.part.data, steps, self.part.variances)


def lagged_latents(A: torch.Tensor, L: torch.Tensor, unit: float, lags: int) -> torch.Tensor:
    """(B, K, n, n): ``X_bs = A_b^s Pi_b`` for s < ``lags``, ``Pi_b = unit L_b L_b'`` (L's
    lower triangle): the replicates' lagged latent covariances from their parameters."""
    Lt = torch.tril(L)
    out = [unit * Lt @ Lt.transpose(1, 2)]
    for _ in range(1, lags):
        out.append(A @ out[-1])
    return torch.stack(out, dim=1)


def replicate_params(
    data: StitchedData,
    steps: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    variances: Sequence[np.ndarray],
) -> list[StitchedLDSParams]:
    """Every replicate's parameters from its ``(C, A, Pi)`` and variances (the fit's own
    guards: A kept stable, Q and R from Pi and the variances)."""
    out = []
    for (C, A, Pi), v in zip(steps, variances, strict=True):
        d = dataclasses.replace(data, variance=v, diag0=v)
        out.append(_noise_and_guards(d, C, A, Pi, data.lags)[0])
    return out


def batched_refit(
    parts: Sequence[RefitPart],
    *,
    tol: float,
    window: int,
    max_passes: int,
    seed: int = 0,
) -> tuple[list[list[StitchedLDSParams]], StageRecord]:
    """Refit every replicate of every part from its part's start, all in one L-BFGS run over
    the sum of their losses (module docstring; parts may differ in their data, e.g. the
    point fit's replicates and the stitch validation's). Returns each part's parameters
    and the stage's record (passes, stop)."""
    batches = [_PartParams(part) for part in parts]
    params = [p for b in batches for p in b.params]

    def objective() -> torch.Tensor:
        return sum(b.evaluate() for b in batches)

    problem = StageProblem(
        stage="refit",
        params=params,
        make_X=batches[0].X,
        term=None,
        tensors=batches[0].loss_of.tensors,
        tol=tol,
        scale=sum(len(p.variances) * p.data.noise_floor() for p in parts),
        seed=seed,
        objective=objective,
    )
    spec = dataclasses.replace(registry()["lbfgs"], window=window)
    record = run_stage(spec, spec.options(max_passes=max_passes), problem, [], {}, None)
    return [b.results() for b in batches], record


def replicate_groups(B: int, per_replicate_bytes: float, budget: float) -> list[range]:
    """Replicates in groups whose stacked sums fit in ``budget`` bytes."""
    size = max(1, min(B, int(budget // max(per_replicate_bytes, 1.0))))
    return [range(a, min(B, a + size)) for a in range(0, B, size)]
