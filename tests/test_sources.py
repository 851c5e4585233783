"""The store holds exactly the input values, ids and trial structure for every source kind."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import zarr
from conftest import SHARED_DATA, write_ophys_nwb, write_suite2p, write_units_nwb

from poplds import DatasetStore, ingest_dataset
from poplds.sources._nwb import count_spikes


def ingest_one(tmp_path, path, **kw):
    out = ingest_dataset(
        [{"path": str(path), "name": "r", **kw.pop("rec", {})}], tmp_path / "ds" / "data.zarr", **kw
    )
    return DatasetStore(out)


def assert_same(stored, expected):
    """Equal values with NaN in the same places (float32 comparison, no tolerance)."""
    stored = np.asarray(stored)
    expected = np.asarray(expected, dtype=np.float32)
    assert stored.dtype == np.float32
    assert stored.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(stored), np.isnan(expected))
    np.testing.assert_array_equal(stored[~np.isnan(stored)], expected[~np.isnan(expected)])


def test_nwb_ophys_values_and_neuron_id_column(tmp_path, rng):
    data = rng.standard_normal((500, 7)).astype(np.float32)
    data[3, 2] = np.nan
    ids = [f"cell{k}" for k in range(7)]
    path = write_ophys_nwb(tmp_path / "a.nwb", data, rate=30.0, neuron_ids=ids)
    store = ingest_one(tmp_path, path)
    assert_same(store.activity("r").compute(), data)
    assert store.neuron_ids[store.neurons("r")].tolist() == ids
    attrs = store.recording_attrs("r")
    assert attrs["rate_hz"] == 30.0 and attrs["kind"] == "traces"
    assert attrs["series"] == "ophys/dff"
    assert len(attrs["sha256"]) == 64 and attrs["source"].endswith("a.nwb")


def test_nwb_ophys_roi_ids_follow_the_region(tmp_path, rng):
    """Without neuron_id the ROI table ids name the neurons, in the series' region order."""
    data = rng.standard_normal((50, 3)).astype(np.float32)
    path = write_ophys_nwb(tmp_path / "a.nwb", data, rois=np.array([2, 0, 5]))
    store = ingest_one(tmp_path, path)
    assert store.neuron_ids[store.neurons("r")].tolist() == ["102", "100", "105"]
    assert_same(store.activity("r").compute(), data)


def test_nwb_ophys_series_choice_and_timestamps(tmp_path, rng):
    data = rng.standard_normal((40, 4)).astype(np.float32)
    stamps = 5.0 + np.arange(40) / 20.0
    path = write_ophys_nwb(tmp_path / "a.nwb", data, series_names=("dff", "raw"), timestamps=stamps)
    store = ingest_one(tmp_path, path, rec={"series": "raw"})
    assert store.recording_attrs("r")["series"] == "ophys/raw"
    assert store.recording_attrs("r")["rate_hz"] == pytest.approx(20.0)
    assert store.recording_attrs("r")["t_start_s"] == pytest.approx(5.0)
    # without series: the first by name
    store = ingest_one(tmp_path, path)
    assert store.recording_attrs("r")["series"] == "ophys/dff"


def test_nwb_ophys_trials_whole_cropped_and_windowed(tmp_path, rng):
    data = rng.standard_normal((300, 5)).astype(np.float32)
    trials = [(1.0, 2.0), (3.0, 3.5), (5.0, 7.0)]  # 10, 5 and 20 frames at 10 Hz
    path = write_ophys_nwb(tmp_path / "a.nwb", data, rate=10.0, trials=trials)
    # whole trials, padded with missing values to the longest: nothing is dropped
    store = ingest_one(tmp_path, path, trials=True)
    x = store.activity("r").compute()
    assert x.shape == (3, 20, 5)
    for r, (start, stop) in enumerate(trials):
        n = int(round((stop - start) * 10))
        assert_same(x[r, :n], data[int(start * 10) : int(start * 10) + n])
        assert np.isnan(x[r, n:]).all()
    assert store.recording_attrs("r")["trial_time_kept_fraction"] == pytest.approx(1.0)
    np.testing.assert_array_equal(store.trial_ids("r"), [0, 1, 2])
    # crop, as an explicit choice: every trial cut to the shortest, the loss recorded
    store = ingest_one(tmp_path, path, trials=True, trial_crop=True)
    x = store.activity("r").compute()
    assert x.shape == (3, 5, 5) and not np.isnan(x).any()
    for r, (start, _) in enumerate(trials):
        assert_same(x[r], data[int(start * 10) : int(start * 10) + 5])
    assert store.recording_attrs("r")["trial_time_kept_fraction"] == pytest.approx(15 / 35)
    # a window past a trial's end: those frames are missing, not taken from between trials
    store = ingest_one(tmp_path, path, trials=True, trial_window=(0.0, 1.0))
    x = store.activity("r").compute()
    assert x.shape == (3, 10, 5)
    assert_same(x[1, :5], data[30:35])
    assert np.isnan(x[1, 5:]).all()
    assert_same(x[2], data[50:60])


def _reference_counts(spikes, edges):
    """Independent reference: numpy.histogram with one extra edge so every bin is half-open."""
    ext = np.append(edges, edges[-1] + 1.0)
    return np.stack([np.histogram(st, ext)[0][:-1] for st in spikes], axis=1)


def test_nwb_units_binning_and_obs_intervals(tmp_path, rng):
    spikes = [np.sort(rng.uniform(0, 10, n)) for n in (50, 200, 5)]
    spikes[0] = np.append(spikes[0], [2.0, 2.02])  # spikes exactly on bin edges
    spikes[0].sort()
    intervals = [
        np.array([[0.0, 10.0]]),
        np.array([[0.0, 4.0], [6.0, 10.0]]),
        np.array([[1.01, 9.0]]),
    ]
    path = write_units_nwb(
        tmp_path / "u.nwb", spikes, neuron_ids=["x", "y", "z"], obs_intervals=intervals
    )
    store = ingest_one(tmp_path, path, bin_size_s=0.02)
    x = store.activity("r").compute()
    last = max(max(s.max() for s in spikes), 10.0)
    n_bins = int(np.floor(last / 0.02)) + 1
    edges = 0.02 * np.arange(n_bins + 1)
    expected = _reference_counts(spikes, edges).astype(np.float32)
    centres = edges[:-1] + 0.01
    inside = np.zeros_like(expected, dtype=bool)
    for u, iv in enumerate(intervals):
        for a, b in iv:
            inside[:, u] |= (edges[:-1] >= a - 1e-9) & (edges[1:] <= b + 1e-9)
    expected[~inside] = np.nan
    assert_same(x, expected)
    # the partly covered bin [1.00, 1.02) of unit z is missing, [1.02, 1.04) is observed
    k = int(np.searchsorted(centres, 1.01))
    assert np.isnan(x[k, 2]) and not np.isnan(x[k + 1, 2])
    assert store.neuron_ids.tolist() == ["x", "y", "z"]
    attrs = store.recording_attrs("r")
    assert attrs["kind"] == "counts" and attrs["rate_hz"] == pytest.approx(50.0)


def test_nwb_units_trials_whole_crop_and_window(tmp_path, rng):
    spikes = [np.sort(rng.uniform(0, 20, 400)) for _ in range(4)]
    trials = [(1.0, 2.0), (5.0, 5.7), (10.0, 11.3)]
    path = write_units_nwb(tmp_path / "u.nwb", spikes, trials=trials, trial_numbers=[7, 8, 10])
    in_trials = sum(int(((st >= a) & (st < b)).sum()) for st in spikes for a, b in trials)
    # whole trials (the default): every bin inside its trial, the rest missing
    store = ingest_one(tmp_path, path, bin_size_s=0.05, trials=True)
    x = store.activity("r").compute()
    assert x.shape == (3, 26, 4)  # the longest trial: 1.3 s / 0.05 s
    np.testing.assert_array_equal(store.trial_ids("r"), [7, 8, 10])
    for r, (start, stop) in enumerate(trials):
        n = int(round((stop - start) / 0.05))
        assert_same(x[r, :n], _reference_counts(spikes, start + 0.05 * np.arange(n + 1)))
        assert np.isnan(x[r, n:]).all()
    assert np.nansum(x) == in_trials  # no spike of a trial is lost, none from between trials
    attrs = store.recording_attrs("r")
    assert attrs["trial_spikes"] == in_trials
    assert attrs["trial_spikes_kept_fraction"] == pytest.approx(1.0)
    assert store.neuron_ids.tolist() == ["10", "11", "12", "13"]  # unit ids
    # crop to the shortest trial, as an explicit choice, with what it dropped recorded
    store = ingest_one(tmp_path, path, bin_size_s=0.05, trials=True, trial_crop=True)
    x = store.activity("r").compute()
    assert x.shape == (3, 14, 4) and not np.isnan(x).any()
    for r, (start, _) in enumerate(trials):
        assert_same(x[r], _reference_counts(spikes, start + 0.05 * np.arange(15)))
    attrs = store.recording_attrs("r")
    assert attrs["trial_time_kept_fraction"] == pytest.approx(2.1 / 3.0)
    assert attrs["trial_spikes_kept_fraction"] == pytest.approx(np.nansum(x) / in_trials)
    # a window reaching before and past the trials: only bins inside a trial are counted
    store = ingest_one(tmp_path, path, bin_size_s=0.05, trials=True, trial_window=(-0.5, 1.5))
    x = store.activity("r").compute()
    assert x.shape == (3, 40, 4)
    for r, (start, stop) in enumerate(trials):
        edges = start - 0.5 + 0.05 * np.arange(41)
        inside = (edges[:-1] >= start - 1e-9) & (edges[1:] <= stop + 1e-9)
        expected = _reference_counts(spikes, edges).astype(np.float32)
        expected[~inside] = np.nan
        assert_same(x[r], expected)
    assert np.nansum(x) == in_trials


def test_count_spikes_half_open_bins():
    counts = count_spikes([np.array([0.0, 0.5, 1.0, 1.0, 2.0])], np.array([0.0, 1.0, 2.0]))
    np.testing.assert_array_equal(counts[:, 0], [2, 2])


def test_npz_continuous_and_trials(tmp_path, rng):
    y = rng.standard_normal((100, 6))
    np.savez(tmp_path / "a.npz", activity=y, neuron_ids=np.arange(6) * 3, rate_hz=12.5)
    store = ingest_one(tmp_path, tmp_path / "a.npz")
    assert_same(store.activity("r").compute(), y.astype(np.float32))
    assert store.neuron_ids.tolist() == ["0", "3", "6", "9", "12", "15"]
    assert store.recording_attrs("r")["kind"] == "traces"

    counts = rng.poisson(2.0, (8, 20, 5)).astype(np.int16)
    np.savez(
        tmp_path / "t.npz",
        activity=counts,
        neuron_ids=np.array(list("abcde")),
        rate_hz=50.0,
        trial_ids=np.array([0, 1, 2, 4, 5, 6, 9, 11]),
    )
    store = ingest_one(tmp_path, tmp_path / "t.npz", trials=True)
    assert_same(store.activity("r").compute(), counts)
    np.testing.assert_array_equal(store.trial_ids("r"), [0, 1, 2, 4, 5, 6, 9, 11])
    assert store.recording_attrs("r")["kind"] == "counts"
    assert store.attrs["trials"] is True


def test_suite2p_neuropil_corrected_cells(tmp_path, rng):
    F = rng.uniform(100, 200, (6, 80)).astype(np.float32)
    Fneu = rng.uniform(10, 50, (6, 80)).astype(np.float32)
    iscell = np.array([[1, 0.9], [0, 0.1], [1, 0.8], [1, 0.7], [0, 0.2], [1, 0.95]])
    folder = write_suite2p(tmp_path / "plane0", F, Fneu, iscell, fs=15.0, neucoeff=0.6)
    store = ingest_one(tmp_path, folder)
    cells = [0, 2, 3, 5]
    expected = (F[cells].astype(np.float64) - 0.6 * Fneu[cells].astype(np.float64)).T
    assert_same(store.activity("r").compute(), expected.astype(np.float32))
    assert store.neuron_ids.tolist() == ["0", "2", "3", "5"]
    assert store.recording_attrs("r")["rate_hz"] == 15.0
    # an explicit coefficient and an id file override the defaults
    (tmp_path / "ids.txt").write_text("m1\nm2\nm3\nm4\n")
    store = ingest_one(
        tmp_path, folder, rec={"neuropil_coefficient": 0.0, "neuron_ids": str(tmp_path / "ids.txt")}
    )
    assert_same(store.activity("r").compute(), F[cells].T)
    assert store.neuron_ids.tolist() == ["m1", "m2", "m3", "m4"]


def test_partial_recordings_share_a_neuron_table(tmp_path, rng):
    a, b = rng.standard_normal((30, 3)), rng.standard_normal((40, 3))
    np.savez(tmp_path / "a.npz", activity=a, neuron_ids=np.array(["a", "b", "c"]), rate_hz=10)
    np.savez(tmp_path / "b.npz", activity=b, neuron_ids=np.array(["c", "d", "a"]), rate_hz=10)
    out = ingest_dataset(
        [{"path": str(tmp_path / "a.npz")}, {"path": str(tmp_path / "b.npz")}],
        tmp_path / "x" / "data.zarr",
    )
    store = DatasetStore(out)
    assert store.neuron_ids.tolist() == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(store.neurons("b"), [2, 3, 0])
    np.testing.assert_array_equal(store.shared_neurons, [[3, 2], [2, 3]])
    np.testing.assert_array_equal(store.recordings_per_neuron, [2, 1, 2, 1])
    assert store.recording_names == ["a", "b"] and store.attrs["dataset"] == "x"


def test_one_file_split_into_partial_recordings(tmp_path, rng):
    """frames and neurons ranges of one file give partial recordings that share neurons;
    a range outside the file is refused, naming the file, the key and the valid range."""
    from poplds import InputError

    y = rng.standard_normal((100, 6)).astype(np.float32)
    np.savez(tmp_path / "a.npz", activity=y, neuron_ids=np.arange(6) * 10, rate_hz=10)
    src = str(tmp_path / "a.npz")
    out = ingest_dataset(
        [
            {"path": src, "name": "early", "frames": [0, 50], "neurons": [0, 4]},
            {"path": src, "name": "late", "frames": [50, 100], "neurons": [2, 6]},
        ],
        tmp_path / "x" / "data.zarr",
    )
    store = DatasetStore(out)
    assert store.neuron_ids.tolist() == ["0", "10", "20", "30", "40", "50"]
    assert_same(store.activity("early").compute(), y[:50, :4])
    assert_same(store.activity("late").compute(), y[50:, 2:])
    np.testing.assert_array_equal(store.shared_neurons, [[4, 2], [2, 4]])
    with pytest.raises(InputError, match=r"a\.npz.*frames: \[90, 120\].*100 time steps"):
        ingest_dataset(
            [{"path": src, "name": "bad", "frames": [90, 120]}], tmp_path / "y" / "data.zarr"
        )


def test_store_chunks_and_codec(tmp_path, rng):
    """Chunks of about chunk_mb with all neurons; the codec by kind and measurement (noisy
    traces raw with a checksum, sparse traces zstd 5 byte shuffle, counts zstd 5 bit
    shuffle), or as asked; values exact under each; the chosen spec in the recording's
    attributes."""
    noisy = rng.standard_normal((20000, 50)).astype(np.float32)  # 4 MB
    sparse = np.where(rng.random((20000, 50)) < 0.01, noisy, 0).astype(np.float32)
    counts = rng.poisson(0.2, size=(20000, 50)).astype(np.int16)
    cases = [  # name, data, codec asked, codec written, its Blosc (cname, level, shuffle)
        ("noisy", noisy, "auto", "none", None),
        ("sparse", sparse, "auto", "zstd:5:byte", ("zstd", 5, "shuffle")),
        ("counts", counts, "auto", "zstd:5:bit", ("zstd", 5, "bitshuffle")),
        ("asked", noisy, "lz4:3:bit", "lz4:3:bit", ("lz4", 3, "bitshuffle")),
        ("old", noisy, "zstd:5:byte", "zstd:5:byte", ("zstd", 5, "shuffle")),  # old default
    ]
    for name, y, codec, spec, blosc in cases:
        np.savez(tmp_path / f"{name}.npz", activity=y, neuron_ids=np.arange(50), rate_hz=10)
        store = ingest_one(tmp_path / name, tmp_path / f"{name}.npz", chunk_mb=1.0, codec=codec)
        arr = zarr.open_array(str(store.path / "recordings/r/activity"), mode="r")
        assert arr.metadata.zarr_format == 3
        assert arr.chunks == (5000, 50)  # 1 MB chunks, all neurons in each
        assert store.recording_attrs("r")["codec"] == spec
        if blosc is None:
            assert [type(c).__name__ for c in arr.compressors] == ["Crc32cCodec"]
        else:
            c = arr.compressors[0]
            assert (c.cname.value, c.clevel, c.shuffle.value) == blosc
        assert_same(store.activity("r").compute(), y)
    with pytest.raises(ValueError, match=r"codec 'gzip:5:byte'"):
        ingest_one(tmp_path / "bad", tmp_path / "noisy.npz", codec="gzip:5:byte")


@pytest.mark.shared_data
def test_real_dentate_gyrus_events(tmp_path):
    path = SHARED_DATA / "dentate_gyrus_events.nwb"
    store = ingest_one(tmp_path, path)
    with h5py.File(path, "r") as f:
        data = f["processing/ophys/events/data"][:]
        ids = [
            v.decode() if isinstance(v, bytes) else v
            for v in f["processing/ophys/ImageSegmentation/cells/neuron_id"][:]
        ]
        rois = f["processing/ophys/events/rois"][:]
    assert_same(store.activity("r").compute(), data)
    assert store.neuron_ids[store.neurons("r")].tolist() == [ids[k] for k in rois]
    assert store.recording_attrs("r")["rate_hz"] == pytest.approx(10.0)


@pytest.mark.shared_data
def test_real_gpe_units_with_trials(tmp_path):
    path = SHARED_DATA / "gpe_bandit_units.nwb"
    store = ingest_one(tmp_path, path, bin_size_s=0.02, trials=True)
    with h5py.File(path, "r") as f:
        flat = f["units/spike_times"][:]
        ends = f["units/spike_times_index"][:].astype(int)
        ids = [v.decode() if isinstance(v, bytes) else v for v in f["units/neuron_id"][:]]
        starts = f["intervals/trials/start_time"][:]
        stops = f["intervals/trials/stop_time"][:]
        numbers = f["intervals/trials/trial_number"][:]
    spikes = np.split(flat, ends[:-1])
    # trials of 0.97-3.1 s, kept whole: padded with missing values, no spike lost
    n_bins = int(np.floor((stops - starts).max() / 0.02 + 1e-6))
    x = store.activity("r").compute()
    assert x.shape == (50, n_bins, 18)
    for r, (a, b) in enumerate(zip(starts, stops, strict=True)):
        edges = a + 0.02 * np.arange(n_bins + 1)
        inside = (edges[:-1] >= a - 1e-9) & (edges[1:] <= b + 1e-9)
        expected = _reference_counts(spikes, edges).astype(np.float32)
        expected[~inside] = np.nan
        assert_same(x[r], expected)
    in_trials = sum(
        int(((st >= a) & (st < b)).sum())
        for st in spikes
        for a, b in zip(starts, stops, strict=True)
    )
    # only a spike in a trial's last, partial bin can be missed
    assert in_trials - 50 * 18 <= np.nansum(x) <= in_trials
    # the README's window [0, 1] runs past the end of two trials: those bins are missing
    store = ingest_one(tmp_path, path, bin_size_s=0.02, trials=True, trial_window=(0.0, 1.0))
    w = store.activity("r").compute()
    short = np.flatnonzero(stops - starts < 1.0)
    assert len(short) == 2
    assert (
        np.isnan(w[short, -1]).all() and not np.isnan(w[np.setdiff1d(np.arange(50), short)]).any()
    )
    assert store.neuron_ids.tolist() == ids
    np.testing.assert_array_equal(store.trial_ids("r"), numbers)


@pytest.mark.shared_data
def test_real_gpe_units_continuous(tmp_path):
    path = SHARED_DATA / "gpe_bandit_units.nwb"
    store = ingest_one(tmp_path, path, bin_size_s=0.05)
    x = store.activity("r").compute()
    with h5py.File(path, "r") as f:
        n_spikes = f["units/spike_times"].shape[0]
    assert np.nansum(x) == n_spikes  # every spike in exactly one bin


def test_lazy_readers_do_not_embed_the_data(tmp_path, rng):
    """suite2p and NWB recordings stay lazy: their dask graphs hold file references, not the
    data (dask copies a numpy memmap whole into its graph, which defeats streaming)."""
    import pickle

    from poplds import RecordingSpec, open_recording

    F = rng.uniform(100, 200, (50, 20000)).astype(np.float32)  # 4 MB
    folder = write_suite2p(tmp_path / "plane0", F, F / 4, np.ones((50, 2)))
    data = rng.standard_normal((20000, 50)).astype(np.float32)
    nwb = write_ophys_nwb(tmp_path / "a.nwb", data)
    for path in (folder, nwb):
        rec = open_recording(RecordingSpec(path), chunk_mb=0.5)
        try:
            graph = dict(rec.activity.__dask_graph__())
            if path == folder:  # h5py datasets do not pickle; their graph is checked by size
                assert len(pickle.dumps(graph)) < 200_000
            arrays = [v for v in graph.values() if isinstance(v, np.ndarray)]
            assert sum(a.nbytes for a in arrays) < 100_000
            assert rec.activity.numblocks[0] > 1
        finally:
            rec.close()
