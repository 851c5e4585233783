"""Which rows of which recording the data term reads, and how: the reading half of the data
term, with no loss algebra in it (that is ``_loss``).

- A *full pass* over a data-route recording reads its rows in windows of the recording's
  read chunk; with several ranks (torch.distributed), each rank reads its own contiguous
  share of the windows (its *span*) plus the ``K-1`` *halo* rows before it, which its lagged
  pairs reach back to (:meth:`DataAccess.span`, :meth:`DataAccess.pass_windows`).
- A *minibatch window* (:class:`Window`) is ``minibatch_rows`` rows of one recording, in
  whole store chunks, with its halo; a streamed window's halo is kept after its first read
  (up to ``HALO_CACHE_BYTES`` in all), so later epochs decode each chunk once, and windows
  are read one ahead in a thread (:meth:`DataAccess.read_ahead`).
- A recording on the moments route is read once, when its lagged moments are formed, and
  evaluated by one rank (:meth:`DataAccess.owns`).

Rows arrive centred, scaled and in group order (``_data.RecordingBlock``): float32 (or the
data's type) on the fit's device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .._distributed import rank_and_size
from ._data import StitchedData, _aligned, read_one_ahead

#: Bytes of streamed minibatch halos kept between epochs (:meth:`DataAccess.read_window`).
HALO_CACHE_BYTES = 1.5e9


@dataclass(frozen=True)
class Window:
    """A minibatch of the data route: rows ``[t0, t1)`` of recording ``rec``."""

    rec: int
    t0: int
    t1: int


class DataAccess:
    """The rows of ``data`` that this rank reads (module docstring).

    ``routes``: each recording's route (``data`` or ``moments``); ``window_rows``: rows per
    minibatch window (default: each recording's read chunk)."""

    def __init__(
        self, data: StitchedData, routes: Sequence[str], window_rows: int | None = None
    ) -> None:
        self.data = data
        self.routes = list(routes)
        self.rank, self.world = rank_and_size()
        # minibatch windows in whole store chunks (a chunk decoded once per epoch), and at
        # least the halo long (a window's halo comes from the window before it)
        self.rows = [
            max(data.lags, _aligned(window_rows or rec.chunk_rows, rec.source))
            for rec in data.recordings
        ]
        self._halos: dict[tuple[int, int], torch.Tensor] = {}
        self._halo_budget = HALO_CACHE_BYTES

    def owns(self, k: int) -> bool:
        """Whether this rank evaluates recording k's moments (one rank per recording)."""
        return k % self.world == self.rank

    def data_recordings(self) -> list[int]:
        """The recordings on the data route, in order."""
        return [k for k, how in enumerate(self.routes) if how == "data"]

    def full_rows(self, k: int) -> int:
        """Rows per window of a full pass over recording k."""
        return max(self.data.lags, self.data.recordings[k].chunk_rows)

    def span(self, k: int) -> tuple[int, int]:
        """This rank's contiguous share ``[lo, hi)`` of recording k's rows on the data route,
        on window boundaries (every rank reads its own time chunks)."""
        rec = self.data.recordings[k]
        rows = self.full_rows(k)
        n_win = -(-rec.n_time // rows)
        lo, hi = (n_win * self.rank) // self.world, (n_win * (self.rank + 1)) // self.world
        return min(rec.n_time, lo * rows), min(rec.n_time, hi * rows)

    def span_halo(self, k: int) -> int:
        """Rows before this rank's span of recording k that its pairs reach back to (none
        when the span is empty)."""
        lo, hi = self.span(k)
        return min(self.data.lags - 1, lo) if hi > lo else 0

    def projection_rows(self, k: int) -> tuple[int, int]:
        """The rows ``[t0, t1)`` whose projections this rank keeps for recording k: its span
        and the halo before it (:meth:`span_halo`)."""
        lo, hi = self.span(k)
        return lo - self.span_halo(k), hi

    def pass_windows(
        self, k: int, halo: int, device: torch.device
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(t0, halo rows (h, N_r), rows (L, N_r))`` of every window of this rank's span of
        recording k, each row read once, each window with ``h = min(halo, t0)`` rows before
        it (``RecordingBlock.windows``)."""
        rec = self.data.recordings[k]
        yield from rec.windows(device, halo, self.full_rows(k), self.span(k))

    def all_windows(
        self, k: int, device: torch.device
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Every window of recording k (all ranks' rows) with ``K-1`` halo rows: the one pass
        that forms its moments."""
        yield from self.data.recordings[k].windows(device, halo=self.data.lags - 1)

    def windows(self) -> list[Window]:
        """Every window of the data route's recordings, in order (the minibatches)."""
        out = []
        for k, rec in enumerate(self.data.recordings):
            if self.routes[k] == "data":
                out += [
                    Window(k, t0, min(rec.n_time, t0 + self.rows[k]))
                    for t0 in range(0, rec.n_time, self.rows[k])
                ]
        return out

    def read_window(self, win: Window, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(halo, rows)`` of a window. A streamed window's halo rows are kept after its first
        read (up to ``HALO_CACHE_BYTES`` in all), so later epochs decode each chunk once."""
        h = min(self.data.lags - 1, win.t0)
        rec = self.data.recordings[win.rec]
        if rec.data is not None or h == 0:
            y = rec.read(win.t0 - h, win.t1, device)
            return y[:h], y[h:]
        halo = self._halos.get((win.rec, win.t0))
        if halo is not None:  # the chunk before need not be decoded again
            return halo, rec.read(win.t0, win.t1, device)
        y = rec.read(win.t0 - h, win.t1, device)
        size = y[:h].numel() * y.element_size()
        if size <= self._halo_budget:
            self._halos[(win.rec, win.t0)] = y[:h].clone()
            self._halo_budget -= size
        return y[:h], y[h:]

    def read_ahead(
        self, wins: Sequence[Window | None], device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
        """The ``(halo, rows)`` of each window in turn (None for None), read one ahead in a
        thread (:meth:`read_window`)."""

        def read(win: Window | None, _slot: int):
            return None if win is None else self.read_window(win, device)

        yield from read_one_ahead(read, wins)
