"""The moment-matching loss and its gradient, without any neuron-by-neuron matrix.

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
         - 2 sum_s sum_r sum_(g,h in r) w_gh(s) tr(X_s Γ_r,hg(s))        model x data
         - sum_i (m_i^2 - 2 m_i d_i) + sum_i max(0, m_i - v_i)^2          lag-0 diagonal

with ``w_gh(s) = 1/n_gh(s)``, ``m_i = C_i X_0 C_i'``, ``d_i`` the lag-0 diagonal of the data,
and ``Γ_r,hg(s) = sum_t z_r,h[t] z_r,g[t+s]'`` from the projections ``z_r,g[t] = C_g' y_r,g[t]``.
The data enter only through ``Z_r = Y_r C`` (per group), so one pass costs two products with
the data: ``Z = Y C`` and, for the gradient, ``dL/dC_g = sum_r Y_r,g' dL/dZ_r,g`` (about
``4 T N n`` flops), plus ``O(T K G_r n (G_r + n))`` for the model x data term (``_CrossTerm``).

float32 products of the data, accumulated over time chunks in float64; everything after
``Z`` is float64.
"""

from __future__ import annotations

import torch

from ._data import StitchedData


def project(data: StitchedData, C: torch.Tensor) -> list[torch.Tensor]:
    """``Z_r`` for every recording: (T_r, G_r, n) float64, ``Z_r[t, g] = C_g' y_r,g[t]``.

    ``C``: (N_total, n) loadings (any float dtype, on the data's device).
    """
    out = []
    for rec in data.recordings:
        Cr = C.detach().to(rec.dtype)[torch.as_tensor(rec.neurons, device=C.device)]
        Z = torch.empty(
            (rec.n_time, len(rec.slices), C.shape[1]), dtype=torch.float64, device=C.device
        )
        for t0, y in rec.chunks(C.device):
            for k, sl in enumerate(rec.slices):
                Z[t0 : t0 + y.shape[0], k] = (y[:, sl] @ Cr[sl]).to(torch.float64)
        out.append(Z)
    return out


def data_gradient(data: StitchedData, dZ: list[torch.Tensor], n_latent: int) -> torch.Tensor:
    """``dL/dC`` through the projections: (N_total, n) float64, ``sum_r Y_r,g' dZ_r,g``."""
    device = dZ[0].device if dZ else torch.device("cpu")
    grad = torch.zeros((data.n_neurons, n_latent), dtype=torch.float64, device=device)
    for rec, dz in zip(data.recordings, dZ, strict=True):
        acc = torch.zeros((len(rec.neurons), n_latent), dtype=torch.float64, device=device)
        dz32 = dz.to(rec.dtype)
        for t0, y in rec.chunks(device):
            d = dz32[t0 : t0 + y.shape[0]]
            for k, sl in enumerate(rec.slices):
                acc[sl] += (y[:, sl].T @ d[:, k]).to(torch.float64)
        grad[torch.as_tensor(rec.neurons, device=device)] += acc
    return grad


class _CrossTerm(torch.autograd.Function):
    """``sum_s sum_t sum_(g,h) w_gh(s) z_g[t+s]' X_s z_h[t]`` for one recording.

    Computed lag by lag through ``V_s[t, g] = sum_h w_gh(s) z_h[t]`` (T, G_r, n), which costs
    ``O(T K G_r n (G_r + n))`` instead of the ``O(T K (G_r n)^2)`` of forming every lagged
    product of Z; the backward pass recomputes V, so memory stays O(T G_r n).
    Inputs: Z (T, G_r, n), X (K, n, n), w (K, G_r, G_r) (no gradient).
    """

    @staticmethod
    def forward(ctx, Z: torch.Tensor, X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        T, G, n = Z.shape
        Zg = Z.permute(1, 0, 2).contiguous()  # (G, T, n): per lag, every step is one GEMM
        ctx.save_for_backward(Zg, X, w)
        flat = Zg.view(G, T * n)
        total = Z.new_zeros(())
        for s in range(X.shape[0]):
            V = w[s] @ flat[:, : (T - s) * n]  # (G, (T-s) n): sum_h w_gh z_h[t]
            ZX = (Zg.view(G * T, n) @ X[s]).view(G, T * n)  # z_g[t]' X_s
            total = total + torch.sum(ZX[:, s * n :] * V)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        Zg, X, w = ctx.saved_tensors
        G, T, n = Zg.shape
        flat = Zg.view(G, T * n)
        dZ = torch.zeros_like(flat)
        dX = torch.zeros_like(X)
        for s in range(X.shape[0]):
            V = w[s] @ flat[:, : (T - s) * n]
            ZX = (Zg.view(G * T, n) @ X[s]).view(G, T * n)
            dZ[:, s * n :] += (V.view(-1, n) @ X[s].T).view(G, -1)  # through z_g[t+s]
            dZ[:, : (T - s) * n] += w[s].T @ ZX[:, s * n :]  # through z_h[t]
            dX[s] = Zg[:, s:].reshape(-1, n).T @ V.view(-1, n)
        return grad * dZ.view(G, T, n).permute(1, 0, 2), grad * dX, None


def reduced_loss(
    data: StitchedData,
    Z: list[torch.Tensor],
    C: torch.Tensor,
    X: torch.Tensor,
    weights: torch.Tensor,
    tensors: dict[str, torch.Tensor],
) -> torch.Tensor:
    """``L~`` of the module docstring (float64 scalar), differentiable in ``Z``, ``C``, ``X``.

    ``C``: (N_total, n) float64; ``X``: (K, n, n) float64; ``weights``: (K, G, G) from
    :meth:`StitchedData.weights`; ``tensors``: the device copies made by :func:`loss_tensors`.
    """
    group_of = tensors["group_of"]
    obs = tensors["observed"]
    n = C.shape[1]
    Cg = C[obs]
    G = torch.zeros((data.n_groups, n, n), dtype=C.dtype, device=C.device)
    G = G.index_add(0, group_of[obs], Cg.unsqueeze(2) * Cg.unsqueeze(1))
    # model^2: sum_s sum_gh O_gh(s) tr(X_s' G_g X_s G_h)
    XtGX = torch.einsum("sab,gac,scd->sgbd", X, G, X)
    model_sq = torch.einsum("sgbd,hdb,sgh->", XtGX, G, tensors["coobserved"])
    # model x data
    cross = C.new_zeros(())
    for z, gidx in zip(Z, tensors["rec_groups"], strict=True):
        w = weights[:, gidx][:, :, gidx]  # (K, G_r, G_r): [s, g, h]
        cross = cross + _CrossTerm.apply(z, X, w)
    # lag-0 diagonal: remove it from both terms, add the hinge of the profiled R
    m = torch.einsum("ia,ab,ib->i", Cg, X[0], Cg)
    d = tensors["diag0"]
    v = tensors["variance"]
    diag = torch.sum(m * m - 2 * m * d)
    hinge = torch.sum(torch.clamp(m - v, min=0) ** 2)
    return (model_sq - 2 * cross - diag + hinge) / tensors["n_pairs"]


def loss_tensors(data: StitchedData, device: torch.device) -> dict[str, torch.Tensor]:
    """Device copies of the data's small bookkeeping arrays used by :func:`reduced_loss`."""
    obs = data.group_of >= 0
    return {
        "group_of": torch.as_tensor(data.group_of, device=device),
        "observed": torch.as_tensor(obs, device=device),
        "coobserved": torch.as_tensor((data.pair_count > 0).astype("float64"), device=device),
        "rec_groups": [torch.as_tensor(r.groups, device=device) for r in data.recordings],
        "diag0": torch.as_tensor(data.diag0[obs], device=device),
        "variance": torch.as_tensor(data.variance[obs], device=device),
        "n_pairs": torch.tensor(max(1.0, data.n_pairs()), dtype=torch.float64, device=device),
    }


def loss_and_grad(
    data: StitchedData,
    C: torch.Tensor,
    X: torch.Tensor,
    weights: torch.Tensor,
    tensors: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: ``L~`` and its gradient with respect to ``C`` (N_total, n), float64.

    ``X`` may carry an autograd graph (it is a function of A and Pi in the linked stage); its
    gradient is accumulated by ``backward`` as usual. ``C`` must be a float64 leaf.
    """
    with torch.no_grad():
        Z = project(data, C)
    Zl = [z.requires_grad_(True) for z in Z]
    Cl = C.detach().requires_grad_(True)
    loss = reduced_loss(data, Zl, Cl, X, weights, tensors)
    loss.backward()
    with torch.no_grad():
        grad = Cl.grad + data_gradient(data, [z.grad for z in Zl], C.shape[1])
    return loss.detach(), grad
