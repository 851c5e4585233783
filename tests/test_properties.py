"""Property-based tests of the readers and the store (hypothesis): whatever goes in comes
out exactly, or ingest stops with an InputError and leaves nothing half-written; never a
traceback of another kind."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from conftest import write_ophys_nwb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from poplds import DatasetStore, InputError, ingest_dataset

PROFILE = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([np.float32, np.float64, np.int16, np.int32, np.uint8])


def _ids(n: int):
    words = st.text("abcxyz0123456789_-", min_size=1, max_size=6)
    return st.one_of(
        st.lists(words, min_size=n, max_size=n),
        st.lists(st.integers(-1000, 1000), min_size=n, max_size=n),
    )


@st.composite
def npz_recordings(draw):
    """(activity, neuron ids, trial ids or None) of random shape, dtype, NaNs and ids."""
    trials = draw(st.booleans())
    T, N = draw(st.integers(1, 12)), draw(st.integers(1, 5))
    shape = (draw(st.integers(1, 4)), T, N) if trials else (T, N)
    dtype = draw(DTYPES)
    if np.issubdtype(dtype, np.floating):
        values = st.floats(-1e6, 1e6, width=32) | st.just(float("nan"))
    else:
        info = np.iinfo(dtype)
        values = st.integers(max(int(info.min), -(2**20)), min(int(info.max), 2**20))
    x = draw(hnp.arrays(dtype, shape, elements=values))
    ids = draw(_ids(N))
    trial_ids = (
        draw(st.lists(st.integers(0, 50), min_size=shape[0], max_size=shape[0])) if trials else None
    )
    return x, ids, trial_ids


def _ingest(work: Path, entries: list[dict], **kw) -> Path | InputError:
    out = work / "ds" / "data.zarr"
    try:
        return ingest_dataset(entries, out, **kw)
    except InputError as err:
        assert not out.exists() and not out.with_name("data.zarr.partial").exists()
        return err


@PROFILE
@given(npz_recordings(), st.sampled_from(["traces", "counts", None]))
def test_npz_round_trip_or_a_clear_error(rec, kind):
    x, ids, trial_ids = rec
    work = Path(tempfile.mkdtemp())
    try:
        extra = {} if trial_ids is None else {"trial_ids": np.asarray(trial_ids)}
        np.savez(work / "r.npz", activity=x, neuron_ids=np.asarray(ids), rate_hz=20.0, **extra)
        entry = {"path": str(work / "r.npz"), **({"kind": kind} if kind else {})}
        result = _ingest(work, [entry], trials=trial_ids is not None)
        if isinstance(result, InputError):
            assert str(work / "r.npz") in str(result)
            return
        store = DatasetStore(result)
        got = store.activity("r").compute()
        np.testing.assert_array_equal(got, x.astype(np.float32))  # NaN where NaN
        assert store.neuron_ids.tolist() == [str(i) for i in ids]
        if trial_ids is not None:
            assert store.trial_ids("r").tolist() == list(trial_ids)
    finally:
        shutil.rmtree(work)


@PROFILE
@given(st.lists(npz_recordings(), min_size=2, max_size=3))
def test_several_recordings_share_one_neuron_table(recs):
    """The global table holds every id once, in order of first appearance, and each
    recording's columns point at their own ids; or the recordings disagree (an InputError)."""
    work = Path(tempfile.mkdtemp())
    try:
        entries = []
        for i, (x, ids, trial_ids) in enumerate(recs):
            extra = {} if trial_ids is None else {"trial_ids": np.asarray(trial_ids)}
            np.savez(
                work / f"r{i}.npz", activity=x, neuron_ids=np.asarray(ids), rate_hz=20.0, **extra
            )
            entries.append({"path": str(work / f"r{i}.npz")})
        result = _ingest(work, entries, trials=recs[0][2] is not None)
        if isinstance(result, InputError):
            return
        store = DatasetStore(result)
        seen = list(dict.fromkeys(str(i) for _, ids, _ in recs for i in ids))
        assert store.neuron_ids.tolist() == seen
        for i, (x, ids, _) in enumerate(recs):
            assert store.neuron_ids[store.neurons(f"r{i}")].tolist() == [str(v) for v in ids]
            np.testing.assert_array_equal(store.activity(f"r{i}").compute(), x.astype(np.float32))
    finally:
        shutil.rmtree(work)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(2, 15), st.integers(1, 4)),
        elements=st.floats(-100, 100, width=32) | st.just(float("nan")),
    )
)
def test_nwb_roi_series_round_trip(x):
    work = Path(tempfile.mkdtemp())
    try:
        path = write_ophys_nwb(work / "r.nwb", x)
        result = _ingest(work, [{"path": str(path)}])
        if isinstance(result, InputError):
            assert str(path) in str(result)
            return
        np.testing.assert_array_equal(DatasetStore(result).activity("r").compute(), x)
    finally:
        shutil.rmtree(work)
