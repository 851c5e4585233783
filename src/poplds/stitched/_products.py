"""Products of the data with small matrices on many columns, fast on every core.

The data term (``_loss``) multiplies windows of ``rows x N_r`` data by ``n``-column loadings
and accumulates ``n x N_r`` gradients. One matrix product of these shapes (10-30 rows against
1e5-1e6 columns) runs on one core of a CPU; split into column blocks it runs on all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _blocks(width: int) -> int:
    """Column blocks a CPU product over ``width`` columns is split into (1: not split).

    One matrix product of these shapes (10-30 rows against 1e5-1e6 columns) runs on one
    core; split into blocks it runs on all, about twice as fast on two cores."""
    nb = 2 * torch.get_num_threads()
    return nb if nb >= 2 and width >= 8192 * nb else 1


def mm_long(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B`` (m, p) for ``A`` (m, K), ``B`` (K, p) with a long contraction ``K``: on the
    CPU the contraction is split into blocks whose products run in parallel and are summed."""
    K = A.shape[1]
    nb = _blocks(K) if A.device.type == "cpu" else 1
    if nb == 1:
        return A @ B
    b = K // nb
    m = nb * b
    out = torch.bmm(A[:, :m].unflatten(1, (nb, b)).transpose(0, 1), B[:m].unflatten(0, (nb, b)))
    out = out.sum(0)
    if m < K:
        out += A[:, m:] @ B[m:]
    return out


class WideSum:
    """``acc[:, sl_g] += A @ B`` over the windows of a pass, for each group ``g`` of a
    recording (``A`` (n, rows), ``B`` (rows, W_g) its columns of a window): the products are
    added in place in the data's type, split into column blocks on the CPU (so they run on
    every core, see :func:`_blocks`), and folded into the float64 total every
    ``flush_every`` windows (no temporaries of the products' size at any window).

    ``n``: rows of ``A``; ``slices``: (G,) the groups' columns of the (n, N_r) total."""

    def __init__(
        self,
        n: int,
        slices: Sequence[slice],
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        flush_every: int = 8,
    ) -> None:
        self.total = torch.zeros((n, width), dtype=torch.float64, device=device)
        self.slices = list(slices)
        self.flush_every = flush_every
        self._windows = 0
        self._parts = []
        for sl in self.slices:
            W = sl.stop - sl.start
            nb = _blocks(W) if device.type == "cpu" else 1
            b = W // nb
            main = torch.zeros((nb, n, b), dtype=dtype, device=device)
            rest = torch.zeros((n, W - nb * b), dtype=dtype, device=device)
            self._parts.append((nb, b, main, rest))

    def add(self, g: int, A: torch.Tensor, B: torch.Tensor) -> None:
        """Add ``A @ B`` into group ``g``'s columns."""
        nb, b, main, rest = self._parts[g]
        m = nb * b
        main.baddbmm_(A.expand(nb, *A.shape), B[:, :m].unflatten(1, (nb, b)).transpose(0, 1))
        if rest.shape[1]:
            rest.addmm_(A, B[:, m:])

    def step(self) -> None:
        """One window done: the partial sums are folded in every ``flush_every`` windows."""
        self._windows += 1
        if self._windows % self.flush_every == 0:
            self._flush()

    def _flush(self) -> None:
        for sl, (nb, b, main, rest) in zip(self.slices, self._parts, strict=True):
            cols = self.total[:, sl]
            cols[:, : nb * b].unflatten(1, (nb, b)).add_(main.transpose(0, 1).to(torch.float64))
            cols[:, nb * b :] += rest.to(torch.float64)
            main.zero_()
            rest.zero_()

    def result(self) -> torch.Tensor:
        """The float64 total (n, N_r)."""
        self._flush()
        return self.total
