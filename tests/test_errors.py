"""Every kind of bad input stops with an error naming the file and the problem, and leaves
no half-written store behind."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_npz, write_ophys_nwb, write_suite2p, write_units_nwb

from poplds import DatasetStore, InputError, ingest_dataset
from poplds import ingest as ingest_module


def ingest(tmp_path, *paths, **kw):
    return ingest_dataset([{"path": str(p)} for p in paths], tmp_path / "ds" / "data.zarr", **kw)


def expect_error(tmp_path, match, culprit, *paths, **kw):
    with pytest.raises(InputError, match=match) as info:
        ingest(tmp_path, *paths, **kw)
    assert str(culprit) in str(info.value), f"message does not name {culprit}: {info.value}"
    assert not (tmp_path / "ds" / "data.zarr").exists()
    assert not (tmp_path / "ds" / "data.zarr.partial").exists()
    return info.value


npz = write_npz


def test_missing_file(tmp_path):
    expect_error(tmp_path, "file not found", "nope.nwb", tmp_path / "nope.nwb")


def test_unknown_format(tmp_path):
    (tmp_path / "data.csv").write_text("1,2\n")
    expect_error(tmp_path, "unknown format '.csv'", "data.csv", tmp_path / "data.csv")
    (tmp_path / "folder").mkdir()
    expect_error(tmp_path, "unknown format", "folder", tmp_path / "folder")


@pytest.mark.parametrize("shape", [(10,), (2, 3, 4, 5)])
def test_wrong_rank(tmp_path, shape):
    path = npz(tmp_path / "a.npz", np.zeros(shape))
    expect_error(tmp_path, f"got {len(shape)} axes", "a.npz", path)


def test_ids_do_not_match_data(tmp_path):
    path = npz(tmp_path / "a.npz", np.zeros((10, 4)), ids=np.arange(3))
    expect_error(tmp_path, "3 neuron ids for 4 neurons.*ids do not match", "a.npz", path)


def test_duplicate_ids(tmp_path):
    path = npz(tmp_path / "a.npz", np.zeros((10, 3)), ids=np.array(["a", "b", "a"]))
    expect_error(tmp_path, "duplicate neuron ids in one recording: a", "a.npz", path)


def test_duplicate_ids_in_nwb(tmp_path, rng):
    path = write_ophys_nwb(
        tmp_path / "d.nwb", rng.standard_normal((20, 3)), neuron_ids=["x", "y", "x"]
    )
    expect_error(tmp_path, "duplicate neuron ids", "d.nwb", path)


def test_non_numeric_data(tmp_path):
    path = npz(tmp_path / "a.npz", np.array([["a", "b"], ["c", "d"]]))
    expect_error(tmp_path, "not numeric", "a.npz", path)


def test_negative_counts(tmp_path):
    counts = np.ones((50, 3), dtype=np.int32)
    counts[7, 1] = -2
    path = npz(tmp_path / "a.npz", counts)
    expect_error(tmp_path, "negative spike counts", "a.npz", path)


def test_fractional_counts(tmp_path):
    path = npz(tmp_path / "a.npz", np.full((5, 2), 0.5), kind="counts")
    expect_error(tmp_path, "not whole numbers", "a.npz", path)


def test_different_sampling_rates(tmp_path):
    a = npz(tmp_path / "a.npz", np.zeros((10, 2)), rate=10.0)
    b = npz(tmp_path / "b.npz", np.zeros((10, 2)), rate=20.0)
    err = expect_error(tmp_path, "sampling rate 20 Hz differs from 10 Hz", "b.npz", a, b)
    assert "a.npz" in str(err)


def test_empty_recording(tmp_path):
    path = npz(tmp_path / "a.npz", np.zeros((0, 3)))
    expect_error(tmp_path, "empty recording", "a.npz", path)


def test_empty_units_table(tmp_path):
    path = write_units_nwb(tmp_path / "u.nwb", [])
    expect_error(
        tmp_path, "neither a RoiResponseSeries nor a units table|empty recording", "u.nwb", path
    )


def test_corrupt_nwb(tmp_path):
    path = tmp_path / "junk.nwb"
    path.write_bytes(b"this is not hdf5" * 100)
    expect_error(tmp_path, "not an HDF5/NWB file", "junk.nwb", path)


def test_truncated_nwb(tmp_path, rng):
    good = write_ophys_nwb(tmp_path / "good.nwb", rng.standard_normal((2000, 20)))
    raw = good.read_bytes()
    cut = tmp_path / "cut.nwb"
    cut.write_bytes(raw[: len(raw) // 2])
    expect_error(tmp_path, "corrupt or truncated", "cut.nwb", cut)


def test_nwb_series_not_found(tmp_path, rng):
    path = write_ophys_nwb(tmp_path / "a.nwb", rng.standard_normal((20, 3)))
    with pytest.raises(InputError, match=r"no RoiResponseSeries named 'deconv'.*ophys/dff"):
        ingest_dataset([{"path": str(path), "series": "deconv"}], tmp_path / "o" / "data.zarr")


def test_trials_without_trials_table(tmp_path, rng):
    path = write_units_nwb(tmp_path / "u.nwb", [np.sort(rng.uniform(0, 5, 20))])
    expect_error(tmp_path, "no trials table", "u.nwb", path, trials=True)


def test_trial_outside_recording(tmp_path, rng):
    path = write_ophys_nwb(
        tmp_path / "a.nwb",
        rng.standard_normal((100, 2)),
        rate=10.0,
        trials=[(1.0, 2.0), (9.5, 11.0)],
    )
    expect_error(tmp_path, "extends outside the recording", "a.nwb", path, trials=True)


def test_suite2p_missing_files(tmp_path):
    folder = write_suite2p(tmp_path / "plane0", np.ones((2, 5)), np.ones((2, 5)), np.ones((2, 2)))
    (folder / "ops.npy").unlink()
    expect_error(tmp_path, r"lacks \['ops.npy'\]", "plane0", folder)


def test_mixed_kinds_and_layouts(tmp_path):
    a = npz(tmp_path / "a.npz", np.zeros((10, 2)))
    b = npz(tmp_path / "b.npz", np.zeros((10, 2), dtype=np.int32))
    expect_error(tmp_path, "cannot mix spike counts and traces", "b.npz", a, b)
    c = npz(tmp_path / "c.npz", np.zeros((3, 10, 2)))
    expect_error(tmp_path, "cannot mix trial and continuous", "c.npz", a, c)


def test_duplicate_recording_names(tmp_path):
    a = npz(tmp_path / "a.npz", np.zeros((10, 2)))
    (tmp_path / "sub").mkdir()
    b = npz(tmp_path / "sub" / "a.npz", np.zeros((10, 2)))
    expect_error(tmp_path, "recording name 'a' is also used", "sub", a, b)


def test_failed_ingest_keeps_the_previous_store(tmp_path):
    good = npz(tmp_path / "good.npz", np.ones((10, 2)))
    out = ingest(tmp_path, good)
    bad = npz(tmp_path / "bad.npz", -np.ones((10, 2), dtype=np.int64))
    with pytest.raises(InputError):
        ingest(tmp_path, bad)
    assert DatasetStore(out).recording_names == ["good"]
    assert not (tmp_path / "ds" / "data.zarr.partial").exists()


def test_interrupted_ingest_resumes(tmp_path, rng, monkeypatch):
    paths = [npz(tmp_path / f"r{k}.npz", rng.standard_normal((100, 3))) for k in range(3)]
    real = ingest_module._write_recording
    written = []

    def flaky(group, rec, *args):
        if rec.name == "r2":
            raise KeyboardInterrupt
        written.append(rec.name)
        return real(group, rec, *args)

    monkeypatch.setattr(ingest_module, "_write_recording", flaky)
    with pytest.raises(KeyboardInterrupt):
        ingest(tmp_path, *paths)
    assert not (tmp_path / "ds" / "data.zarr").exists()  # nothing half-written in place
    assert (tmp_path / "ds" / "data.zarr.parts" / "r1.zarr").exists()  # written so far
    written.clear()
    monkeypatch.setattr(
        ingest_module,
        "_write_recording",
        lambda group, rec, *a: (written.append(rec.name), real(group, rec, *a)),
    )
    out = ingest(tmp_path, *paths)
    assert written == ["r2"]  # r0 and r1 were not written again
    store = DatasetStore(out)
    for k, p in enumerate(paths):
        np.testing.assert_array_equal(
            store.activity(f"r{k}").compute(), np.load(p)["activity"].astype(np.float32)
        )


def test_changed_source_is_not_resumed_from_stale_data(tmp_path, rng, monkeypatch):
    paths = [npz(tmp_path / f"r{k}.npz", rng.standard_normal((100, 3))) for k in range(2)]
    real = ingest_module._write_recording

    def stop_at_r1(group, rec, *args):
        if rec.name == "r1":
            raise KeyboardInterrupt
        return real(group, rec, *args)

    monkeypatch.setattr(ingest_module, "_write_recording", stop_at_r1)
    with pytest.raises(KeyboardInterrupt):
        ingest(tmp_path, *paths)
    monkeypatch.setattr(ingest_module, "_write_recording", real)
    new = rng.standard_normal((100, 3))
    npz(paths[0], new)  # r0 changed after it was written to the partial store
    store = DatasetStore(ingest(tmp_path, *paths))
    np.testing.assert_array_equal(store.activity("r0").compute(), new.astype(np.float32))


@pytest.mark.parametrize(
    ("arrays", "kw", "match"),
    [
        ([np.random.default_rng(0).poisson(1.0, (50, 4))], {}, r"not \(trials, time, neurons\)"),
        ([np.random.default_rng(0).random((5, 10, 4))], {"trials": True}, "not counts"),
        (
            [np.ones((5, 10, 4), dtype=np.int32), 2 * np.ones((5, 10, 4), dtype=np.int32)],
            {"trials": True},
            "one recording of trials",
        ),
    ],
)
def test_nplds_refuses_unsuitable_stores(tmp_path, arrays, kw, match):
    from poplds.nplds import NPLDSOutputs, NPLDSSettings, fit_store

    paths = [npz(tmp_path / f"r{i}.npz", a) for i, a in enumerate(arrays)]
    store = ingest(tmp_path, *paths, **kw)
    with pytest.raises(InputError, match=match) as info:
        out = NPLDSOutputs.under(tmp_path / "ds", 1, NPLDSSettings().models)
        fit_store(store, 1, NPLDSSettings(max_iter=2), outputs=out)
    assert str(store) in str(info.value)
    assert not (tmp_path / "ds" / "nplds").exists()


# ---------------------------------------------------------------- issue 10: nothing silent


@pytest.mark.parametrize("stem", [".", "..", "two words", "ça"])
def test_unusable_default_names_are_refused_before_any_write(tmp_path, stem):
    path = npz(tmp_path / f"{stem}.npz", np.random.default_rng(0).random((20, 3)))
    err = expect_error(tmp_path, "not a usable recording name.*set name:", path.name, path)
    assert repr(stem) in str(err)
    # the same file with a name is fine
    store = ingest_dataset([{"path": str(path), "name": "ok"}], tmp_path / "ds" / "data.zarr")
    assert DatasetStore(store).recording_names == ["ok"]


def test_values_beyond_float32_are_named_not_stored_as_infinite(tmp_path):
    x = np.random.default_rng(0).random((20, 3))
    x[4, 1] = 1e39  # finite in float64, infinite in float32
    path = npz(tmp_path / "big.npz", x)
    expect_error(tmp_path, r"values up to 1e\+39 exceed float32's range", "big.npz", path)


def test_wrong_number_of_ids_blames_the_ids_file(tmp_path):
    path = npz(tmp_path / "a.npz", np.zeros((10, 4)))
    ids = tmp_path / "ids.txt"
    ids.write_text("n1\nn2\nn3\n")
    with pytest.raises(InputError, match=r"ids.txt: 3 neuron ids for the 4 neurons of .*a.npz"):
        ingest_dataset([{"path": str(path), "neuron_ids": str(ids)}], tmp_path / "d.zarr")
    assert not (tmp_path / "d.zarr.partial").exists()


@pytest.mark.parametrize("shape", [(1, 5), (4, 1, 5)])
def test_a_single_time_step_is_refused(tmp_path, shape):
    path = npz(tmp_path / "one.npz", np.ones(shape))
    expect_error(tmp_path, "1 time step per .*at least 2", "one.npz", path, trials=len(shape) == 3)


def test_the_same_data_twice_is_refused(tmp_path):
    path = npz(tmp_path / "a.npz", np.random.default_rng(0).random((20, 3)))
    copy = tmp_path / "copy.npz"
    copy.write_bytes(path.read_bytes())
    expect_error(tmp_path, "'copy' is the same data as recording 'a'", "copy.npz", path, copy)


def test_empty_and_constant_neurons_are_named_in_the_log(tmp_path, caplog):
    x = np.random.default_rng(0).random((30, 4))
    x[:, 1] = np.nan
    x[:, 3] = 2.5
    path = npz(tmp_path / "a.npz", x, ids=np.array(["u", "v", "w", "z"]))
    with caplog.at_level("WARNING", logger="poplds"):
        store = DatasetStore(ingest(tmp_path, path))
    text = caplog.text
    assert "a.npz" in text and "no observed value" in text and "['v']" in text
    assert "constant over the whole recording" in text and "['z']" in text
    attrs = store.recording_attrs("a")
    assert attrs["empty_neurons"] == ["v"] and attrs["constant_neurons"] == ["z"]


def test_nplds_latent_dims_beyond_the_active_neurons_names_the_key(tmp_path):
    from poplds.nplds import NPLDSSettings, fit_store

    counts = np.random.default_rng(1).poisson(0.5, (10, 20, 3)).astype(np.int32)
    path = npz(tmp_path / "t.npz", counts, trial_ids=np.arange(10))
    store = ingest(tmp_path, path, trials=True)
    with pytest.raises(InputError, match=r"^nplds\.latent_dims: k = 5 exceeds the 3 neurons"):
        fit_store(store, 5, NPLDSSettings(max_iter=2, device="cpu"))


def test_a_job_started_with_sigint_ignored_still_stops_on_ctrl_c():
    """A fit job inherits SIGINT ignored from how it is started; setup_job restores Ctrl-C."""
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import time; from poplds._logging import setup_job; setup_job(None, 1); "
        "print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert proc.stdout.readline().strip() == "ready"
    t = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert time.perf_counter() - t < 10


def test_a_job_tells_errors_a_user_can_act_on_without_a_traceback(tmp_path):
    """Inside a workflow job (setup_job) an InputError prints its message alone, in the
    terminal and the log, and the job exits non-zero; a bug keeps its traceback."""
    import subprocess
    import sys

    log = tmp_path / "job.log"
    setup = f"from poplds._logging import setup_job; setup_job({str(log)!r}); "
    told = subprocess.run(
        [
            sys.executable,
            "-c",
            setup + "from poplds import InputError; "
            "raise InputError('data/x.npz', 'negative spike counts')",
        ],
        capture_output=True,
        text=True,
    )
    assert told.returncode == 1
    assert "data/x.npz: negative spike counts" in told.stderr
    assert "Traceback" not in told.stderr
    assert "data/x.npz: negative spike counts" in log.read_text()
    bug = subprocess.run([sys.executable, "-c", setup + "1 / 0"], capture_output=True, text=True)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "ZeroDivisionError" in bug.stderr


def _full_disk(folder):
    """Mount a 1 MB tmpfs at ``folder`` (root on Linux), or skip."""
    import shutil
    import subprocess

    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")


def test_a_full_disk_during_ingest_is_told_and_leaves_nothing(tmp_path):
    """Ingesting onto a disk that fills up (a 1 MB tmpfs, 4 MB of incompressible data) stops
    with the path, the free space and what the data need, keeps no partial store, and the
    same call with room succeeds."""
    import subprocess

    from poplds import NoSpaceError

    data = npz(tmp_path / "big.npz", np.random.default_rng(0).standard_normal((20_000, 50)))
    disk = tmp_path / "disk"
    _full_disk(disk)
    try:
        with pytest.raises(NoSpaceError) as info:
            ingest_dataset([{"path": str(data)}], disk / "ds" / "data.zarr")
        message = str(info.value)
        assert str(disk / "ds") in message and "no space left on the device" in message
        assert " free of 1.05 MB on that disk" in message
        assert "take up to 4 MB uncompressed" in message and "Nothing half-written" in message
        left = [p.relative_to(disk) for p in disk.rglob("*") if p.is_file()]
        assert not [p for p in left if "partial" in str(p) or p.suffix == ".zarr"], left
        assert not (disk / "ds" / "data.zarr").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    store = ingest_dataset([{"path": str(data)}], tmp_path / "room" / "data.zarr")
    assert DatasetStore(store).activity("big").shape == (20_000, 50)


def test_a_damaged_chunk_names_the_recording_and_the_remedy(tmp_path):
    """A chunk that no longer decodes stops a fit with the store, the recording, the chunk
    and how to ingest it again, not with the decoder's RuntimeError."""
    from poplds.stitched import StitchedSettings, fit_store

    rng = np.random.default_rng(1)
    a = npz(tmp_path / "a.npz", rng.standard_normal((400, 6)), ids=np.arange(6))
    b = npz(tmp_path / "b.npz", rng.standard_normal((400, 6)), ids=np.arange(3, 9))
    store = ingest(tmp_path, a, b)
    assert DatasetStore(store).damaged_chunks() == {}
    chunk = next(
        p
        for p in (store / "recordings" / "b" / "activity").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    raw = bytearray(chunk.read_bytes())
    raw[20:60] = bytes(range(40))
    chunk.write_bytes(bytes(raw))
    assert list(DatasetStore(store).damaged_chunks()) == ["b"]
    with pytest.raises(InputError) as info:
        fit_store(store, 2, StitchedSettings(device="cpu", lags=3), checkpoints=tmp_path / "ck")
    message = str(info.value)
    assert message.startswith(f"{store}: the store is damaged")
    assert "recording b: 1 chunk(s)" in message and "recordings/b/activity/c/" in message
    assert "results/<dataset>/recordings/<name>.zarr" in message and "run snakemake" in message
