"""The Snakemake workflow: runs from another working directory, validates its config with
messages naming the key, and shows bad-input errors in the terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO

from poplds import DatasetStore

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def run_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *SNAKEMAKE,
            "-s",
            str(REPO / "Snakefile"),
            "--directory",
            str(workdir),
            "--configfile",
            str(workdir / "config.yaml"),
            "--cores",
            "2",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def write_config(workdir: Path, datasets: dict) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump({"datasets": datasets}))


@pytest.mark.slow
def test_workflow_runs_from_another_directory(tmp_path, rng):
    work = tmp_path / "project"
    (work / "data").mkdir(parents=True)
    ids = np.array([f"c{i}" for i in range(10)])
    np.savez(
        work / "data" / "a.npz",
        activity=rng.standard_normal((200, 6)),
        neuron_ids=ids[:6],
        rate_hz=10.0,
    )
    np.savez(
        work / "data" / "b.npz",
        activity=rng.standard_normal((300, 6)),
        neuron_ids=ids[4:],
        rate_hz=10.0,
    )
    write_config(
        work,
        {
            "real": {
                "recordings": [{"path": "data/a.npz"}, {"path": "data/b.npz", "name": "second"}]
            },
            "sim": {
                "simulate": {
                    "model": "stitched_lds",
                    "n_neurons": 20,
                    "latent_dim": 2,
                    "recordings": [
                        {"name": "s1", "neurons": [0, 12], "n_time": 100},
                        {"name": "s2", "neurons": [8, 20], "n_time": 100},
                    ],
                }
            },
        },
    )
    proc = run_snakemake(work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = DatasetStore(work / "results" / "real" / "data.zarr")
    assert store.recording_names == ["a", "second"]
    np.testing.assert_array_equal(store.shared_neurons, [[6, 2], [2, 6]])
    assert store.attrs["dataset"] == "real"
    sim = DatasetStore(work / "results" / "sim" / "data.zarr")
    assert len(sim.neuron_ids) == 20
    for ds in ("real", "sim"):
        assert (work / "results" / ds / "figures" / "coverage.png").stat().st_size > 10_000
        assert (work / "logs" / ds / "ingest.log").exists()
    assert not (REPO / "results" / "real").exists()  # nothing written beside the Snakefile
    # the same config and data give the same store values
    again = run_snakemake(work, "--forceall")
    assert again.returncode == 0
    np.testing.assert_array_equal(
        DatasetStore(work / "results" / "sim" / "data.zarr").activity("s1").compute(),
        sim.activity("s1").compute(),
    )


@pytest.mark.slow
def test_bad_input_error_shown_in_terminal(tmp_path):
    work = tmp_path / "project"
    (work / "data").mkdir(parents=True)
    np.savez(
        work / "data" / "bad.npz",
        activity=-np.ones((10, 3), dtype=np.int32),
        neuron_ids=np.arange(3),
        rate_hz=10.0,
    )
    write_config(work, {"d": {"recordings": [{"path": "data/bad.npz"}]}})
    proc = run_snakemake(work)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "bad.npz: negative spike counts" in out
    assert not (work / "results" / "d" / "data.zarr").exists()
    assert not (work / "results" / "d" / "data.zarr.partial").exists()


@pytest.mark.parametrize(
    ("dataset", "needle"),
    [
        ({"recordings": [{"path": "x.npz"}], "bin_size": 0.1}, "bin_size"),
        ({"recordings": [{"path": "x.npz"}], "bin_size_s": -1}, "bin_size_s"),
        ({"recordings": [{"path": "x.npz"}], "models": ["gpfa"]}, "gpfa"),
        ({"recordings": [{"name": "x"}]}, "'path' is a required property"),
        (
            {"simulate": {"model": "stitched_lds", "n_neurons": 5, "latent_dim": 2}},
            "'recordings' is a required property",
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path, dataset, needle):
    write_config(tmp_path, {"d": dataset})
    proc = run_snakemake(tmp_path, "-n")
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr


def test_missing_input_named(tmp_path):
    write_config(tmp_path, {"d": {"recordings": [{"path": "data/absent.nwb"}]}})
    proc = run_snakemake(tmp_path, "-n")
    assert proc.returncode != 0
    assert "data/absent.nwb" in proc.stdout + proc.stderr


def test_snakemake_lint_is_clean():
    proc = subprocess.run(
        [*SNAKEMAKE, "--lint", "--configfile", str(REPO / "config.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations" in proc.stdout + proc.stderr
