"""The dataset store: one Zarr v3 group per dataset, ``results/<dataset>/data.zarr``.

Layout::

    data.zarr/
      neuron_ids                       (N_total,) str    every neuron of the dataset
      recordings/<name>/activity       f32 (time, neurons) or (trials, time, neurons); NaN: missing
      recordings/<name>/neurons        int64 (neurons,)  positions in neuron_ids
      recordings/<name>/trial_ids      int64 (trials,)   trial data only
      recordings/<name>/trial_table/<column>  float64 (trials,)  NWB trials table's numeric
                                                         columns (trial data only)
      coverage/recording_names         (R,) str          row/column order of shared_neurons
      coverage/shared_neurons          int64 (R, R)      neurons observed by both recordings
      coverage/recordings_per_neuron   int32 (N_total,)  how many recordings observed each neuron

Group attributes: the root has ``format``, ``poplds_version``, ``dataset``, ``recordings``,
``rate_hz``, ``kind`` and ``trials``; each recording has ``rate_hz``, ``kind`` (``traces`` or
``counts``), ``source``, ``sha256``, ``poplds_version``, ``n_missing`` and its reader's provenance.

Activity is chunked along time (along trials for trial data) with all neurons of a recording
in every chunk, about ``chunk_mb`` MB per chunk, compressed by the recording's ``codec``
(:func:`choose_codec`; its spec is in the recording's ``codec`` attribute; zarr reads any
codec from the array's metadata, so stores written before read as they were). Small arrays
use Blosc zstd 5 with byte shuffle.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from ._errors import InputError

# Snakemake marks a directory output (every .zarr of the workflow) with a .snakemake_timestamp
# file, which zarr warns about each time it lists the group's members: nothing is wrong.
warnings.filterwarnings(
    "ignore", message=r"Object at \.snakemake_timestamp is not recognized", category=UserWarning
)

FORMAT = "poplds-store-1"


#: Codec of a recording's activity by kind when the configuration says ``auto`` (chosen from
#: ``benchmarks/bench_codec.py``; README "Store format"): spike counts compress 35-50x with
#: bit shuffle at 55-83 % of the decode speed of raw float32; traces are measured per
#: recording (:func:`choose_codec`).
AUTO_CODEC = {"counts": "zstd:5:bit", "traces": "auto"}
#: ``auto`` for traces: compressed with this codec when a sample chunk shrinks below
#: ``AUTO_MAX_RATIO`` of its size (sparse events: 2-4 % at raw decode speed), else stored raw
#: (noisy float traces: 87-96 % of their size, decoded 1.3-2.3x slower than raw).
AUTO_TRACES_CODEC, AUTO_MAX_RATIO = "zstd:5:byte", 0.5
_SHUFFLES = {"byte": BloscShuffle.shuffle, "bit": BloscShuffle.bitshuffle}


def compressor(codec: str = "zstd:5:byte") -> list[BloscCodec | Crc32cCodec]:
    """The zarr compressors of a codec spec: ``none`` (stored raw, with a CRC-32C checksum per
    chunk so that a damaged chunk is still found: :meth:`DatasetStore.damaged_chunks`) or
    ``<cname>:<level>:<shuffle>`` (Blosc zstd or lz4, level 1-9, byte or bit shuffle). Small
    arrays use the default."""
    if codec == "none":
        return [Crc32cCodec()]
    parts = codec.split(":")
    if (
        len(parts) != 3
        or parts[0] not in ("zstd", "lz4")
        or parts[1] not in tuple("123456789")
        or parts[2] not in _SHUFFLES
    ):
        raise ValueError(f"codec {codec!r}: expected none or <zstd|lz4>:<1-9>:<byte|bit>")
    level = int(parts[1])
    return [BloscCodec(cname=parts[0], clevel=level, shuffle=_SHUFFLES[parts[2]])]


def choose_codec(codec: str, kind: str, sample: Callable[[], np.ndarray]) -> str:
    """The codec spec a recording's activity is written with: ``codec`` itself unless it is
    ``auto``; then :data:`AUTO_CODEC` by ``kind`` (``traces`` or ``counts``), and for traces
    :data:`AUTO_TRACES_CODEC` if ``sample()`` (e.g. the first chunk; read only for traces)
    compresses below :data:`AUTO_MAX_RATIO` of its size with it, else ``none``."""
    if codec != "auto":
        compressor(codec)  # checks the spec
        return codec
    chosen = AUTO_CODEC[kind]
    if chosen != "auto":
        return chosen
    x = np.ascontiguousarray(sample(), dtype=np.float32)
    if x.size == 0:
        return AUTO_TRACES_CODEC
    probe = zarr.create_array(
        zarr.storage.MemoryStore(),
        shape=x.shape,
        dtype="float32",
        chunks=x.shape,
        compressors=compressor(AUTO_TRACES_CODEC),
    )
    probe[...] = x
    ratio = probe.nbytes_stored() / x.nbytes
    return AUTO_TRACES_CODEC if ratio < AUTO_MAX_RATIO else "none"


def activity_chunks(shape: Sequence[int], chunk_mb: float = 4.0, itemsize: int = 4) -> tuple:
    """Chunk shape holding about ``chunk_mb`` MB with all neurons of a recording in each chunk.

    ``(time, neurons)`` is chunked along time; ``(trials, time, neurons)`` along trials with
    whole trials in a chunk, or along time inside a trial when one trial is larger than that.
    """
    budget = max(1, int(chunk_mb * 1e6 // itemsize))
    n = int(shape[-1])
    if len(shape) == 2:
        return (int(min(shape[0], max(1, budget // n))), n)
    per_trial = int(shape[1]) * n
    if per_trial <= budget:
        return (int(min(shape[0], max(1, budget // per_trial))), int(shape[1]), n)
    return (1, int(min(shape[1], max(1, budget // n))), n)


def write_strings(group: zarr.Group, name: str, values: np.ndarray) -> None:
    """A 1-D array of unicode strings."""
    values = np.asarray(values, dtype=str)
    arr = group.create_array(
        name,
        shape=values.shape,
        dtype=str,
        chunks=(max(1, min(len(values), 1 << 17)),),
        compressors=compressor(),
    )
    if len(values):
        arr[:] = values


def write_array(group: zarr.Group, name: str, values: np.ndarray) -> None:
    """A small numeric array in one chunk."""
    values = np.asarray(values)
    arr = group.create_array(
        name,
        shape=values.shape,
        dtype=values.dtype,
        chunks=tuple(max(1, s) for s in values.shape),
        compressors=compressor(),
    )
    arr[...] = values


def create_activity(
    group: zarr.Group, shape: Sequence[int], chunk_mb: float, codec: str = "zstd:5:byte"
) -> zarr.Array:
    """The float32 activity array of one recording, filled with NaN until written, compressed
    with ``codec`` (:func:`compressor`)."""
    return group.create_array(
        "activity",
        shape=tuple(int(s) for s in shape),
        dtype="float32",
        chunks=activity_chunks(shape, chunk_mb),
        compressors=compressor(codec),
        fill_value=np.nan,
    )


def coverage(
    neurons_per_recording: Sequence[np.ndarray], n_total: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shared-neuron counts (R, R) and recordings per neuron (N_total,).

    ``shared[a, b] = |neurons(a) ∩ neurons(b)|`` (the diagonal is each recording's size);
    ``per_neuron[i] = #{r : i in neurons(r)}``.
    """
    r = len(neurons_per_recording)
    observed = np.zeros((r, n_total), dtype=np.float32)
    for k, idx in enumerate(neurons_per_recording):
        observed[k, idx] = 1.0
    shared = np.rint(observed @ observed.T).astype(np.int64)
    per_neuron = observed.sum(axis=0).astype(np.int32)
    return shared, per_neuron


def _as_unicode(values: np.ndarray) -> np.ndarray:
    """Zarr's variable-length strings as a fixed-width numpy unicode array."""
    return np.array(values.tolist(), dtype=str) if len(values) else np.array([], dtype=str)


class DatasetStore:
    """Read access to a dataset store written by :func:`poplds.ingest.ingest_dataset`.

    >>> store = DatasetStore("results/demo/data.zarr")          # doctest: +SKIP
    >>> x = store.activity("s1")       # dask array, (time, neurons) of recording s1
    >>> ids = store.neuron_ids[store.neurons("s1")]
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.root = zarr.open_group(str(self.path), mode="r")
        if self.root.attrs.get("format") != FORMAT:
            raise InputError(self.path, "not a poplds dataset store")

    @property
    def attrs(self) -> dict[str, Any]:
        """The dataset's attributes (rate_hz, kind, recordings, poplds_version, ...)."""
        return dict(self.root.attrs)

    @property
    def neuron_ids(self) -> np.ndarray:
        """(N_total,) ids of every neuron of the dataset."""
        return _as_unicode(self.root["neuron_ids"][:])

    @property
    def recording_names(self) -> list[str]:
        """Recording names in configuration order."""
        return list(self.root.attrs["recordings"])

    @property
    def coverage_names(self) -> list[str]:
        """Row and column order of :attr:`shared_neurons` (the recording names)."""
        return _as_unicode(self.root["coverage/recording_names"][:]).tolist()

    def recording_attrs(self, name: str) -> dict[str, Any]:
        """Attributes of one recording (rate_hz, kind, source, sha256, ...)."""
        return dict(self.root[f"recordings/{name}"].attrs)

    def activity(self, name: str) -> da.Array:
        """Lazy float32 activity of one recording, (time, neurons) or (trials, time, neurons)."""
        return da.from_zarr(self.root[f"recordings/{name}/activity"])

    def neurons(self, name: str) -> np.ndarray:
        """(neurons,) positions of the recording's neurons in :attr:`neuron_ids`."""
        return np.asarray(self.root[f"recordings/{name}/neurons"][:])

    def trial_columns(self, name: str) -> dict[str, np.ndarray]:
        """The recording's trials-table columns ``{name: (trials,) float64}`` (may be empty)."""
        group = self.root[f"recordings/{name}"]
        if "trial_table" not in group:
            return {}
        table = group["trial_table"]
        return {key: np.asarray(table[key][:]) for key in sorted(table.array_keys())}

    def trial_ids(self, name: str) -> np.ndarray | None:
        """(trials,) trial numbers of trial data, else None."""
        group = self.root[f"recordings/{name}"]
        return np.asarray(group["trial_ids"][:]) if "trial_ids" in group else None

    @property
    def shared_neurons(self) -> np.ndarray:
        """(R, R) neurons observed by both recordings, in :attr:`recording_names` order."""
        return np.asarray(self.root["coverage/shared_neurons"][:])

    @property
    def recordings_per_neuron(self) -> np.ndarray:
        """(N_total,) number of recordings that observed each neuron."""
        return np.asarray(self.root["coverage/recordings_per_neuron"][:])

    def damaged_chunks(self) -> dict[str, list[str]]:
        """Per recording, the chunk files of its arrays that cannot be decoded, with the
        decoder's error (an empty dict for a sound store). Reads every chunk once."""
        out: dict[str, list[str]] = {}
        for name in self.recording_names:
            group = self.root[f"recordings/{name}"]
            for key in ("activity", "trial_ids", "neurons"):
                if key in group:
                    bad = _undecodable(group[key])
                    if bad:
                        out.setdefault(name, []).extend(f"{key}/{b}" for b in bad)
        return out


def _undecodable(arr: zarr.Array) -> list[str]:
    """Chunk keys of ``arr`` (relative to it, e.g. ``c/3/0``) that raise when decoded."""
    grid = [range(-(-int(s) // int(c))) for s, c in zip(arr.shape, arr.chunks, strict=True)]
    encoding = arr.metadata.chunk_key_encoding
    bad = []
    for index in itertools.product(*grid):
        sel = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, arr.chunks, strict=True))
        try:
            arr[sel]
        except (RuntimeError, ValueError, OSError) as exc:
            bad.append(f"{encoding.encode_chunk_key(index)} ({exc})")
    return bad


@contextmanager
def damage_named(store: DatasetStore) -> Iterator[None]:
    """Turn a failure while reading ``store`` (a decoder's ``RuntimeError: error during blosc
    decompression``, say) into an :class:`InputError` that names the damaged recordings and
    chunks and says how to re-ingest them, when the store is indeed damaged; any other
    failure goes on as it was."""
    try:
        yield
    except (RuntimeError, ValueError, OSError) as exc:
        if isinstance(exc, InputError):
            raise
        damaged = store.damaged_chunks()
        if not damaged:
            raise
        told = "; ".join(
            f"recording {name}: {len(keys)} chunk(s) cannot be decoded, e.g. "
            f"recordings/{name}/{keys[0]}"
            for name, keys in damaged.items()
        )
        raise InputError(
            store.path,
            f"the store is damaged ({told}). Ingest these recordings again: delete the store "
            f"and each damaged recording's part store (results/<dataset>/recordings/<name>.zarr "
            "in the workflow, whose chunk files are the same, hard-linked), then run snakemake "
            "again; it ingests only the deleted recordings and assembles the store anew",
        ) from exc
