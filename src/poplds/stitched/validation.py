"""Stitch validation: covariances of pairs the fit never saw together, scored on real data.

In each recording r that shares enough neurons with the others, the observations *in r* of a
seeded part ``V_r`` of its shared neurons are hidden (each hidden neuron stays observed in
another recording). A pair ``(v, j)``, ``v in V_r``, ``j`` another neuron of r, is then never
co-observed in the validation fit's data, yet r holds its lagged covariances: the fit's
prediction ``C_v X_s C_j'`` (and ``C_j X_s C_v'``) is scored against them, per lag, as the
held-out pairs are. This tests the stitch itself, which co-observed held-out pairs cannot.

Choice of ``V_r`` (:func:`choose_hidden`): recordings in order, each one's shared neurons in a
seeded random order; a neuron is hidden in r when (a) it is hidden in no other recording,
(b) every pair of recordings keeps at least ``keep`` neurons observed in both (the overlaps
that link the recordings; ``keep`` is at least the largest latent dimension tried + 2, so
the split is the same for every n), and (c) r hides at most ``fraction`` of its shared
neurons. A recording where fewer than ``MIN_HIDDEN`` neurons can be hidden takes no part.

The validation fit reads no data: its groups, pair counts and weights follow from the
recordings' neuron sets alone, and its lagged sums are sub-matrices of the point fit's
(:func:`reduced_data`); it starts from the point estimate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._data import StitchedData
from ._prepare import _pair_counts, observation_groups

#: A recording takes part in the validation when it can hide at least this many neurons.
MIN_HIDDEN = 2


def choose_hidden(
    data: StitchedData, fraction: float, keep: int, seed: int
) -> dict[int, np.ndarray]:
    """``{recording index: dataset positions hidden in it}`` (module docstring)."""
    out: dict[int, np.ndarray] = {}
    if fraction <= 0:
        return out
    recs = data.recordings
    observed_in = np.zeros((data.n_neurons, len(recs)), dtype=bool)
    for k, r in enumerate(recs):
        observed_in[r.neurons, k] = True
    overlap = observed_in.T.astype(np.int64) @ observed_in.astype(np.int64)  # (R, R)
    hidden_anywhere: set[int] = set()
    rng = np.random.default_rng([seed, 23])
    for k, rec in enumerate(recs):
        shared = np.sort(rec.neurons[observed_in[rec.neurons].sum(axis=1) > 1])
        cap = int(np.floor(fraction * len(shared)))
        seen, ov = observed_in.copy(), overlap.copy()  # tentative until enough are hidden
        picked: list[int] = []
        for v in rng.permutation(shared):
            if len(picked) >= cap:
                break
            if int(v) in hidden_anywhere:
                continue
            others = np.flatnonzero(seen[v])
            others = others[others != k]
            if np.all(ov[k, others] - 1 >= keep):
                picked.append(int(v))
                ov[k, others] -= 1
                ov[others, k] -= 1
                seen[v, k] = False
        if len(picked) >= MIN_HIDDEN:  # too few, and the recording takes no part
            out[k] = np.array(sorted(picked), dtype=np.int64)
            observed_in, overlap = seen, ov
            hidden_anywhere.update(picked)
    return out


@dataclass
class ReducedData:
    """The validation fit's data.

    data: the :class:`StitchedData` with the hidden observations removed (its recordings
    hold no data: the fit runs on ``moments``); columns: per recording, the reduced block's
    columns in the point fit's block; hidden: per recording index, dataset positions hidden.
    """

    data: StitchedData
    columns: list[np.ndarray]
    hidden: dict[int, np.ndarray]

    def moments(self, full: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The reduced recordings' lagged sums from the point fit's ``full`` (K, N_r, N_r)."""
        out = []
        for S, cols in zip(full, self.columns, strict=True):
            c = torch.as_tensor(cols, device=S.device)
            out.append(S[:, c][:, :, c])
        return out


def pooled_variance(data: StitchedData, moments: Sequence[torch.Tensor]) -> np.ndarray:
    """(N_total,) each neuron's lag-0 sum pooled over the recordings that hold it, divided
    by their time steps (NaN where none does): the variance the moments imply."""
    total = np.zeros(data.n_neurons)
    count = np.zeros(data.n_neurons)
    for rec, S in zip(data.recordings, moments, strict=True):
        total[rec.neurons] += torch.diagonal(S[0]).cpu().numpy()
        count[rec.neurons] += rec.n_time
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def reduced_data(
    data: StitchedData, hidden: dict[int, np.ndarray], heldout_fraction: float
) -> ReducedData:
    """:class:`ReducedData` for ``hidden`` (no data read)."""
    kept = []
    for k, rec in enumerate(data.recordings):
        drop = np.isin(rec.neurons, hidden.get(k, np.empty(0, dtype=np.int64)))
        kept.append(np.flatnonzero(~drop))
    group_of, membership = observation_groups(
        [rec.neurons[c] for rec, c in zip(data.recordings, kept, strict=True)],
        data.n_neurons,
        data.label,
    )
    held_labels = np.zeros((3, 3), dtype=bool)
    held_labels[1, 2] = held_labels[2, 1] = heldout_fraction > 0
    lengths = np.array([rec.n_time for rec in data.recordings], dtype=np.float64)
    pair_count, heldout = _pair_counts(
        lengths, membership, group_of, data.label, held_labels, data.lags
    )
    blocks, columns = [], []
    for rec, keep in zip(data.recordings, kept, strict=True):
        cols = keep[np.argsort(group_of[rec.neurons[keep]], kind="stable")]
        neurons = rec.neurons[cols]
        groups, starts = np.unique(group_of[neurons], return_index=True)
        bounds = list(starts) + [len(neurons)]
        blocks.append(
            dataclasses.replace(
                rec,
                neurons=neurons,
                groups=groups,
                slices=[
                    slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
                ],
                mean=rec.mean[cols],
                scale=rec.scale[cols],
                column_order=rec.column_order[cols],
                data=None,
                _mean_t=None,
                _order_t=None,
                _scale_t=None,
            )
        )
        columns.append(cols)
    reduced = dataclasses.replace(
        data,
        recordings=blocks,
        group_of=group_of,
        group_size=np.bincount(group_of[group_of >= 0], minlength=membership.shape[0]),
        membership=membership,
        pair_count=pair_count,
        heldout=heldout,
    )
    return ReducedData(reduced, columns, hidden)


@dataclass
class ValidationPairs:
    """The pairs a validation fit is scored on, per recording taking part.

    rec: recording index; hidden: (h,) columns of the hidden neurons in the point fit's
    block of that recording; other: (o,) columns of the neurons they are never co-observed
    with in the validation fit's data. Pairs are ``(hidden, other)`` and ``(other, hidden)``
    at every lag (the two orders are different lagged covariances).
    """

    rec: int
    hidden: np.ndarray
    other: np.ndarray


def validation_pairs(data: StitchedData, reduced: ReducedData) -> list[ValidationPairs]:
    """Every recording's validation pairs (module docstring)."""
    red = reduced.data
    out = []
    for k, hid in reduced.hidden.items():
        rec = data.recordings[k]
        col = {int(v): c for c, v in enumerate(rec.neurons)}
        hcols = np.array([col[int(v)] for v in hid])
        g_hid = red.group_of[hid]
        g_all = red.group_of[rec.neurons]
        co = red.membership[g_hid].astype(np.int64) @ red.membership[g_all].T.astype(np.int64)
        never = (co == 0) & (g_all[None, :] >= 0)
        # a neuron the others never meet with every hidden neuron (and not itself hidden)
        other = np.flatnonzero(never.all(axis=0) & ~np.isin(rec.neurons, hid))
        if len(other):
            out.append(ValidationPairs(k, hcols, other))
    return out


def validation_covariances(
    pairs: Sequence[ValidationPairs], moments: Sequence[torch.Tensor], n_time: Sequence[int]
) -> np.ndarray:
    """Empirical lagged covariances of the validation pairs from each recording's lagged sums
    ``moments`` (point fit's column order): (K, P) with the pairs in the order of
    :func:`pair_index`."""
    parts = []
    for p in pairs:
        S = moments[p.rec]
        K = S.shape[0]
        h = torch.as_tensor(p.hidden, device=S.device)
        o = torch.as_tensor(p.other, device=S.device)
        a = S[:, h][:, :, o].reshape(K, -1)
        b = S[:, o][:, :, h].reshape(K, -1)
        denom = torch.as_tensor(
            np.maximum(n_time[p.rec] - np.arange(K), 1), dtype=S.dtype, device=S.device
        )
        parts.append(torch.cat([a, b], dim=1) / denom[:, None])
    return torch.cat(parts, dim=1).cpu().numpy() if parts else np.zeros((0, 0))


def validation_predictions(
    pairs: Sequence[ValidationPairs], data: StitchedData, C: np.ndarray, X: np.ndarray
) -> np.ndarray:
    """The model's lagged covariances ``C_i X_s C_j'`` of the validation pairs: (K, P)."""
    parts = []
    for p in pairs:
        rec = data.recordings[p.rec]
        Ch, Co = C[rec.neurons[p.hidden]], C[rec.neurons[p.other]]
        a = ((Ch @ X) @ Co.T).reshape(X.shape[0], -1)
        b = ((Co @ X) @ Ch.T).reshape(X.shape[0], -1)
        parts.append(np.concatenate([a, b], axis=1))
    return np.concatenate(parts, axis=1) if parts else np.zeros((0, 0))
