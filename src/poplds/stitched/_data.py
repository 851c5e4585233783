"""Partial recordings prepared for moment matching: centred, grouped by observation pattern.

Each recording ``r`` observes neurons ``idx_r`` (positions in the dataset's neuron table) over
its own ``T_r`` time steps. Neurons observed by the same set of recordings (and, for the
held-out split, carrying the same random label) form one *group* ``g``. Two groups are
co-observed at lag ``s`` when they share a recording longer than ``s``; the number of
co-observed sample pairs is

    n_gh(s) = sum over recordings r holding both g and h of (T_r - s)          (1)

and every empirical lagged covariance of neurons ``i in g``, ``j in h`` is a pooled sum over
those recordings divided by ``n_gh(s)``. Everything the fit needs from the data is
``Z_r[t, g] = C_g' y_r,g[t]`` (time, groups_r, latents), so no neuron-by-neuron matrix exists.

Missing values (NaN) are set to zero after centring and each neuron's column is divided by
its observed fraction in that recording, which makes pooled sums unbiased when values are
missing at random; with no missing values (the usual case) every statistic is exact.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")


class Staging:
    """Host buffers of streamed windows, kept from pass to pass (fresh memory of this size
    costs page faults at every pass: a third of a million-neuron decode) and shared by a
    dataset's recordings, which stream one at a time; a stream opened while another holds
    the buffers gets buffers of its own."""

    def __init__(self) -> None:
        self._free: dict[tuple[torch.dtype | None, bool], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def lease(self, dtype: torch.dtype | None, pin: bool) -> Iterator[_Lease]:
        """The buffers of type ``dtype`` (pinned host memory when ``pin``) for one stream."""
        with self._lock:
            held = self._free.pop((dtype, pin), None)
        lease = _Lease(held or [], dtype, pin)
        try:
            yield lease
        finally:
            with self._lock:
                self._free[(dtype, pin)] = lease.buffers


@dataclass
class _Lease:
    buffers: list[torch.Tensor]
    dtype: torch.dtype | None
    pin: bool

    def get(self, i: int, shape: tuple[int, int]) -> torch.Tensor:
        """Buffer ``i`` viewed as ``shape`` (grown when smaller)."""
        size = shape[0] * shape[1]
        while len(self.buffers) <= i:
            self.buffers.append(torch.empty(0, dtype=self.dtype))
        if self.buffers[i].numel() < size:
            self.buffers[i] = torch.empty(0, dtype=self.dtype)  # the old one freed first
            self.buffers[i] = torch.empty(size, dtype=self.dtype, pin_memory=self.pin)
        return self.buffers[i][:size].view(shape)


@dataclass
class RecordingBlock:
    """One recording, prepared: columns sorted by group, centred, missing values zero-filled.

    Attributes
    ----------
    name: recording name.
    neurons: (N_r,) positions in the dataset's neuron table, in *group-sorted* column order.
    groups: (G_r,) global ids of the groups in this recording, in column order.
    slices: (G_r,) column slices of each group.
    mean: (N_r,) per-neuron means (of observed values) in the group-sorted order.
    n_time: T_r.
    data: (T_r, N_r) float32 tensor on the device, or None when streamed from ``source``.
    source: the (time, neurons) array the recording came from (streamed when ``data`` is
        None, and read for the positions of missing values).
    has_missing: whether any value is missing (NaN).
    dtype: the floating type of the data products (float32; float64 for exact checks).
    column_order: (N_r,) the source's columns in group-sorted order (columns left out of the
        fit, see :func:`prepare_data`, are not among them).
    source_mean: (columns of the source,) every column's mean in the source's order.
    mean, scale: (N_r,) per-neuron mean and 1 / observed fraction, group-sorted order.
    """

    name: str
    neurons: np.ndarray
    groups: np.ndarray
    slices: list[slice]
    mean: np.ndarray
    scale: np.ndarray
    n_time: int
    data: torch.Tensor | None = None
    source: object | None = None
    column_order: np.ndarray | None = None
    source_mean: np.ndarray | None = None
    chunk_rows: int = 8192
    has_missing: bool = False
    dtype: torch.dtype = torch.float32
    staging: Staging | None = field(default=None, repr=False)
    _mean_t: torch.Tensor | None = field(default=None, repr=False)
    _order_t: torch.Tensor | None = field(default=None, repr=False)
    _identity: bool = field(default=False, repr=False)
    _scale_t: torch.Tensor | None = field(default=None, repr=False)

    def mean_in_source_order(self) -> np.ndarray:
        """(N_r,) means of every column of the source, in its own order (NaN for a neuron it
        never observes; a column left out of the fit keeps its mean)."""
        if self.source_mean is not None:
            return self.source_mean
        out = np.empty_like(self.mean)
        out[self.column_order] = self.mean
        return out

    def raw_chunks(self, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(t0, y - mean)`` (rows, N_r), group-sorted, NaN kept (unscaled)."""
        for t0 in range(0, self.n_time, self.chunk_rows):
            block = np.asarray(self.source[t0 : t0 + self.chunk_rows], dtype=np.float64)
            block = block[:, self.column_order] - self.mean
            yield t0, torch.as_tensor(block, device=device).to(self.dtype)

    def _prepared(self, device: torch.device, dtype: torch.dtype):
        if self._mean_t is None or self._mean_t.device != device or self._mean_t.dtype != dtype:
            self._mean_t = torch.as_tensor(self.mean, dtype=dtype, device=device)
            self._scale_t = torch.as_tensor(self.scale, dtype=dtype, device=device)
        return self._mean_t, self._scale_t

    def _decode(self, t0: int, t1: int, raw: np.ndarray | None = None) -> torch.Tensor:
        """Rows ``[t0, t1)`` of the source in its own column order (host memory): a zarr
        source decoded into the front of ``raw`` (rows, source columns) when given (reused
        buffers spare the page faults of fresh memory, which cost a million-neuron decode
        more than a third of its time), else as the source returns them."""
        if raw is not None:
            return _decode_into(self.source, t0, t1, raw)
        rows = self.source[t0:t1]
        # rows of an in-memory array are a view of it: copied, as the rows are centred in place
        copy = isinstance(self.source, np.ndarray)
        return torch.from_numpy(np.array(rows, copy=True) if copy else np.asarray(rows))

    def _identity_order(self) -> bool:
        """Whether the group-sorted order is the source's own (no column moves)."""
        if self._order_t is None:
            self._order_t = torch.as_tensor(self.column_order)
            n_src = int(self.source.shape[1])
            self._identity = bool(
                len(self.column_order) == n_src
                and np.array_equal(self.column_order, np.arange(n_src))
            )
        return self._identity

    def _order(
        self, block: torch.Tensor, out: torch.Tensor | None = None, pin: bool = False
    ) -> torch.Tensor:
        """``block`` (rows, source columns) in group-sorted column order, into the front of
        ``out`` (rows, N_r) when given (``block`` itself when no column moves)."""
        if self._identity_order():
            return block
        if out is not None and out.dtype == block.dtype:
            return torch.index_select(block, 1, self._order_t, out=out[: block.shape[0]])
        host = torch.index_select(block, 1, self._order_t)
        return host.pin_memory() if pin else host

    def _to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Rows as read to prepared rows: ``(y - mean) * scale``, missing values 0, computed in
        the wider of the source's and the data's floating types (float32 for a store);
        in place when ``host`` is already on ``device`` in that type."""
        work = torch.promote_types(host.dtype, self.dtype)
        if not work.is_floating_point:
            work = torch.float64
        mean, scale = self._prepared(device, work)
        y = host.to(device).to(work)  # a copy unless on the device already
        y.sub_(mean)
        if self.has_missing:
            y.mul_(scale)
            torch.nan_to_num_(y, nan=0.0)
        return y.to(self.dtype)

    def read(self, t0: int, t1: int, device: torch.device) -> torch.Tensor:
        """Prepared rows ``[t0, t1)`` (rows, N_r) on ``device`` (a view when in memory)."""
        if self.data is not None:
            return self.data[t0:t1]
        host = self._order(self._decode(t0, t1), pin=device.type == "cuda")
        return self._to_device(host, device)

    def chunks(self, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(t0, Y[t0:t1])`` float32 (rows, N_r) on ``device``, prepared (centred,
        zero-filled, scaled); see :meth:`windows`."""
        for t0, _halo, y in self.windows(device, halo=0):
            yield t0, y

    def windows(
        self,
        device: torch.device,
        halo: int,
        rows: int | None = None,
        span: tuple[int, int] | None = None,
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(t0, Y[t0 - h : t0], Y[t0 : t1])`` for consecutive windows ``[t0, t1)`` of
        ``rows`` rows (default ``chunk_rows``) covering ``span`` (default all rows; it starts on
        a window boundary), each with its ``h = min(halo, t0)`` halo rows before it. Every row
        is read once: streamed windows keep the last rows of the one before (the first window
        of a span reads its own) and are decoded one ahead in a background thread into two
        reused buffers, put in group order (into two more, pinned on a GPU) and, on the CPU,
        centred there too, while this thread computes on the window before. A window is valid
        until the next is asked for."""
        rows = rows or self.chunk_rows
        if halo > rows:
            raise ValueError(f"a window of {rows} rows cannot carry a halo of {halo}")
        a, b = span or (0, self.n_time)
        starts = list(range(a, b, rows))
        if self.data is not None:
            for t0 in starts:
                h = min(halo, t0)
                yield t0, self.data[t0 - h : t0], self.data[t0 : min(b, t0 + rows)]
            return
        pin = device.type == "cuda"
        on_host = device.type == "cpu"
        tail = self.read(a - min(halo, a), a, device)  # the first window's halo
        src = getattr(self.source, "dtype", None)
        src_t = torch.from_numpy(np.empty(0, dtype=src)).dtype if src is not None else None
        floating = src_t is not None and src_t.is_floating_point
        staging = self.staging or Staging()
        with staging.lease(src_t if floating else None, pin) as buffers:
            outs, raws = [None, None], [None, None]
            if floating and not self._identity_order():
                outs = [buffers.get(i, (rows, len(self.neurons))) for i in range(2)]
            if floating and _is_zarr(self.source):
                n_src = int(self.source.shape[1])
                raws = [buffers.get(2 + i, (rows, n_src)).numpy() for i in range(2)]

            def prepare(t0: int, i: int) -> torch.Tensor:
                """Window ``[t0, t0 + rows)`` decoded, in group order and (on the CPU)
                centred, in buffers ``i``: all in the background thread, so this thread's
                products overlap the whole of it."""
                host = self._order(self._decode(t0, min(b, t0 + rows), raws[i]), outs[i], pin)
                return self._to_device(host, device) if on_host else host

            for t0, y in zip(starts, read_one_ahead(prepare, starts), strict=True):
                if not on_host:
                    y = self._to_device(y, device)
                h = min(halo, t0)
                yield t0, tail[tail.shape[0] - h :], y
                tail = y[max(0, y.shape[0] - halo) :].clone()


def read_one_ahead(read: Callable[[Any, int], T], items: Sequence[Any]) -> Iterator[T]:
    """``read(item, slot)`` of each item in turn, the next one read in a background thread
    while the caller works on this one; ``slot`` alternates 0, 1, so a reader that fills
    one of two buffers never writes the one the caller holds (an item is valid until the
    next is asked for)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(read, items[0], 0) if len(items) else None
        for k in range(len(items)):
            y = future.result()
            if k + 1 < len(items):
                future = pool.submit(read, items[k + 1], (k + 1) % 2)
            yield y


def _is_zarr(source: object) -> bool:
    """Whether ``source`` is a zarr array (whose rows can be decoded into a given buffer)."""
    return type(source).__module__.startswith("zarr") and hasattr(source, "get_basic_selection")


def _decode_into(source, t0: int, t1: int, buffer: np.ndarray) -> torch.Tensor:
    """Decode rows ``[t0, t1)`` of a zarr array into the front of ``buffer`` (rows, columns)."""
    from zarr.core.buffer.cpu import NDBuffer

    front = buffer[: max(0, min(t1, source.shape[0]) - t0)]
    source.get_basic_selection(slice(t0, t0 + len(front)), out=NDBuffer.from_numpy_array(front))
    return torch.from_numpy(front)


@dataclass
class StitchedData:
    """All recordings of a dataset, grouped by observation pattern.

    Attributes
    ----------
    n_neurons: N_total.
    recordings: the prepared recordings.
    group_of: (N_total,) group id of each neuron (-1: never observed).
    group_size: (G,) neurons per group.
    membership: (G, R) bool, which recordings observe each group.
    lags: K, lags 0..K-1 are matched.
    pair_count: (K, G, G) float64 co-observed sample pairs ``n_gh(s)`` of eq. (1), with
        held-out group pairs set to 0.
    heldout: (G, G) bool, group pairs kept out of the fit (co-observed, but masked).
    variance: (N_total,) pooled empirical variance of each neuron (NaN if never observed).
    diag0: (N_total,) pooled lag-0 diagonal as the scaled data give it (equals ``variance``
        without missing values).
    label: (N_total,) the random label of each neuron used by the held-out split.
    device: where the fit computes.
    left_out: per recording, the dataset positions of the neurons left out of it because it
        never observes them (``never_observed``) or they are constant in it (``constant``).
    moment_budget: bytes the lagged moments of the recordings on the moments route may take
        on the device (``_loss.choose_routes``): a quarter of what the data may take.
    """

    n_neurons: int
    recordings: list[RecordingBlock]
    group_of: np.ndarray
    group_size: np.ndarray
    membership: np.ndarray
    lags: int
    pair_count: np.ndarray
    heldout: np.ndarray
    variance: np.ndarray
    diag0: np.ndarray
    label: np.ndarray
    device: torch.device = torch.device("cpu")
    left_out: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    moment_budget: float = 2e9

    @property
    def n_groups(self) -> int:
        return len(self.group_size)

    def weights(self, device: torch.device) -> torch.Tensor:
        """(K, G, G) float64 ``1 / n_gh(s)``, 0 where not co-observed or held out."""
        w = np.zeros_like(self.pair_count)
        np.divide(1.0, self.pair_count, out=w, where=self.pair_count > 0)
        return torch.as_tensor(w, device=device)

    def n_pairs(self) -> float:
        """Number of neuron pairs (i, j, s) in the loss: co-observed, not held out, lag-0
        diagonal excluded."""
        sizes = self.group_size.astype(np.float64)
        per_lag = np.einsum("sgh,g,h->", (self.pair_count > 0).astype(np.float64), sizes, sizes)
        return float(per_lag - np.sum(self.group_size))

    def noise_floor(self) -> float:
        """The sampling noise of the matched covariances, per pair of the loss:

            (1/P) sum_(i,j,s) v_i v_j / n_ij(s)

        over the fitted pairs (lag-0 diagonal excluded), ``v`` the variances and ``n_ij(s)``
        the co-observed samples: the variance of an empirical lagged covariance of weakly
        correlated neurons. Changes of the loss far below it change no prediction that the
        data can resolve, so the convergence test is set against it (scale-free: it is in the
        loss's units whatever the units, rates or sparsity of the data)."""
        obs = self.group_of >= 0
        v = np.nan_to_num(self.variance[obs], nan=0.0)
        g = self.group_of[obs]
        vg = np.bincount(g, weights=v, minlength=self.n_groups)
        w = np.zeros_like(self.pair_count)
        np.divide(1.0, self.pair_count, out=w, where=self.pair_count > 0)
        total = np.einsum("sgh,g,h->", w, vg, vg) - np.sum(v**2 * w[0, g, g])
        return float(total) / max(1.0, self.n_pairs())


def _stat_rows(n_columns: int, source: object = None) -> int:
    """Rows per read of the statistics passes: about 16 MB of float64, in whole store chunks."""
    return _aligned(max(1, int(16e6 // (8 * max(1, n_columns)))), source)


def _aligned(rows: int, source: object) -> int:
    """``rows`` rounded down to whole chunks of a chunked source (at least one chunk), so
    that no chunk is decoded twice by consecutive reads."""
    chunks = getattr(source, "chunks", None)
    c = chunks[0] if chunks else None
    if isinstance(c, int) and c > 0:
        return max(c, rows // c * c)
    return rows


def _row_chunks(n: int, rows: int) -> Iterator[tuple[int, int]]:
    for t0 in range(0, n, rows):
        yield t0, min(n, t0 + rows)
