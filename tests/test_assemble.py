"""One part per recording (ingest_recording), then assemble_dataset: the same store as
ingest_dataset, chunks shared with the parts, and every bad part named before anything is
written."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import assert_same_store
from conftest import write_npz as npz

from poplds import DatasetStore, InputError, assemble_dataset, ingest_dataset, ingest_recording


@pytest.fixture
def sessions(tmp_path, rng):
    """Three partial recordings of 10 neurons with overlapping id sets."""
    ids = np.array([f"n{i}" for i in range(10)])
    specs = [
        {"path": npz(tmp_path / "a.npz", rng.standard_normal((300, 5)), ids[:5])},
        {"path": npz(tmp_path / "b.npz", rng.standard_normal((200, 5)), ids[3:8]), "name": "B"},
        {"path": npz(tmp_path / "c.npz", rng.standard_normal((250, 4)), ids[[9, 0, 7, 8]])},
    ]
    return tmp_path, specs


def ingest_parts(tmp_path: Path, specs, **kw) -> list[Path]:
    names = [s.get("name", Path(s["path"]).stem) for s in specs]
    return [
        ingest_recording(s, tmp_path / "parts" / f"{n}.zarr", chunk_mb=0.002, **kw)
        for s, n in zip(specs, names, strict=True)
    ]


def test_parts_assemble_to_the_store_ingest_dataset_writes(sessions):
    tmp, specs = sessions
    parts = ingest_parts(tmp, specs)
    built = assemble_dataset(parts, tmp / "ds" / "data.zarr", dataset="ds")
    whole = ingest_dataset(specs, tmp / "ref" / "ds" / "data.zarr", dataset="ds", chunk_mb=0.002)
    assert_same_store(built, whole)
    store = DatasetStore(built)
    assert store.recording_names == ["a", "B", "c"]
    # the global table in order of first appearance; each recording's columns in it
    assert store.neuron_ids.tolist() == [f"n{i}" for i in (0, 1, 2, 3, 4, 5, 6, 7, 9, 8)]
    assert store.neuron_ids[store.neurons("c")].tolist() == ["n9", "n0", "n7", "n8"]
    np.testing.assert_array_equal(store.shared_neurons, [[5, 2, 1], [2, 5, 1], [1, 1, 4]])
    # several chunks per recording, each one file shared with its part (hard links)
    chunk_files = [p for p in (parts[0] / "activity").rglob("*") if p.is_file()]
    assert len(chunk_files) > 2 and all(p.stat().st_nlink == 2 for p in chunk_files)
    rel = chunk_files[0].relative_to(parts[0])
    assert os.path.samefile(chunk_files[0], built / "recordings" / "a" / rel)
    # a part replaced later (a new ingest renames a new folder in) leaves the store intact
    before = store.activity("a").compute()
    ingest_recording(specs[1], parts[0], chunk_mb=0.002)
    np.testing.assert_array_equal(DatasetStore(built).activity("a").compute(), before)


def test_configuration_order_decides_the_neuron_table(sessions):
    tmp, specs = sessions
    parts = ingest_parts(tmp, specs)
    store = DatasetStore(assemble_dataset(parts[::-1], tmp / "ds" / "data.zarr"))
    assert store.recording_names == ["c", "B", "a"]
    assert store.neuron_ids.tolist()[:4] == ["n9", "n0", "n7", "n8"]
    assert store.attrs["dataset"] == "ds"  # the default: the store's folder


def assemble_error(tmp: Path, parts, match: str, culprit) -> None:
    out = tmp / "ds" / "data.zarr"
    with pytest.raises(InputError, match=match) as info:
        assemble_dataset(parts, out)
    assert str(culprit) in str(info.value), f"does not name {culprit}: {info.value}"
    assert not out.exists() and not out.with_name("data.zarr.partial").exists()


def test_a_missing_part_is_named(sessions):
    tmp, specs = sessions
    parts = ingest_parts(tmp, specs[:2])
    assemble_error(tmp, [*parts, tmp / "parts" / "c.zarr"], "not a readable", "c.zarr")


def test_an_incomplete_part_is_named(sessions):
    tmp, specs = sessions
    parts = ingest_parts(tmp, specs)
    group = zarr.open_group(str(parts[1]), mode="r+")
    group.attrs["recording"] = {**group.attrs["recording"], "complete": False}
    assemble_error(tmp, parts, "not a complete poplds recording part", parts[1])
    # a dataset store is not a part
    store = ingest_dataset(specs[:1], tmp / "other" / "data.zarr")
    assemble_error(tmp, [store], "is a dataset store, not a recording part", store)


def test_parts_ingested_with_other_settings_are_refused(sessions):
    tmp, specs = sessions
    parts = ingest_parts(tmp, specs)
    odd = ingest_recording(specs[2], tmp / "odd" / "c.zarr", chunk_mb=0.5)
    assemble_error(tmp, [*parts[:2], odd], "ingest every recording of a dataset with the same", odd)


def test_recordings_that_disagree_are_refused(sessions, rng):
    tmp, specs = sessions
    parts = ingest_parts(tmp, specs)
    slow = npz(tmp / "slow.npz", rng.standard_normal((100, 3)), ["x", "y", "z"], rate=5.0)
    (slow_part,) = ingest_parts(tmp, [{"path": slow}])
    assemble_error(tmp, [parts[0], slow_part], "sampling rate 5 Hz differs", "slow.npz")
    twice = ingest_recording(
        {"path": specs[0]["path"], "name": "again"}, tmp / "again.zarr", chunk_mb=0.002
    )
    assemble_error(tmp, [parts[0], twice], "is the same data as recording 'a'", "a.npz")
    same_name = ingest_recording(
        {"path": specs[1]["path"], "name": "a"}, tmp / "x" / "a.zarr", chunk_mb=0.002
    )
    assemble_error(tmp, [parts[0], same_name], "name 'a' is also used", "b.npz")
    assemble_error(tmp, [], "no recordings", "data.zarr")


def test_a_failed_assembly_keeps_the_previous_store(sessions):
    tmp, specs = sessions
    parts = ingest_parts(tmp, specs)
    out = assemble_dataset(parts[:2], tmp / "ds" / "data.zarr")
    with pytest.raises(InputError):
        assemble_dataset([*parts[:2], tmp / "nope.zarr"], out)
    assert DatasetStore(out).recording_names == ["a", "B"]
