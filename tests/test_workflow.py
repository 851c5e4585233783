"""The Snakemake workflow: runs from another working directory, validates its config with
messages naming the key, and shows bad-input errors in the terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from conftest import REPO, assert_same_store

from poplds import DatasetStore, ingest_dataset
from poplds._outputs import MODELS

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def run_snakemake(
    workdir: Path, *args: str, python: tuple[list[str], dict[str, str]] | None = None
) -> subprocess.CompletedProcess:
    """``snakemake`` on ``workdir``'s config; ``python``: the interpreter command and
    environment to run it with (default this one, with warnings off)."""
    cmd, env = python or ([sys.executable], {**os.environ, "PYTHONWARNINGS": "ignore"})
    return subprocess.run(
        [
            *cmd,
            *SNAKEMAKE[1:],
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
        env=env,
    )


def two_recording_simulation(n_neurons: int, latent_dim: int, cuts: tuple, n_time: int) -> dict:
    """A ``simulate:`` block: recording s1 sees neurons [0, cuts[0]), s2 [cuts[1], N)."""
    return {
        "model": "stitched_lds",
        "n_neurons": n_neurons,
        "latent_dim": latent_dim,
        "recordings": [
            {"name": "s1", "neurons": [0, cuts[0]], "n_time": n_time},
            {"name": "s2", "neurons": [cuts[1], n_neurons], "n_time": n_time},
        ],
    }


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
                "recordings": [{"path": "data/a.npz"}, {"path": "data/b.npz", "name": "second"}],
                "stitched_lds": {"latent_dims": [2], "lags": 4},
            },
            "sim": {
                "simulate": two_recording_simulation(20, 2, (12, 8), 1500),
                "stitched_lds": {"latent_dims": [1, 2], "lags": 5, "device": "cpu"},
            },
        },
    )
    proc = run_snakemake(work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = DatasetStore(work / "results" / "real" / "data.zarr")
    assert store.recording_names == ["a", "second"]
    # one ingest job per recording, then the assembly: the store ingest_dataset writes
    reference = ingest_dataset(
        [{"path": "data/a.npz"}, {"path": "data/b.npz", "name": "second"}],
        tmp_path / "reference" / "real" / "data.zarr",
        base_dir=work,
    )
    assert_same_store(store.path, reference)
    assert sorted(p.name for p in (work / "results" / "real" / "recordings").iterdir()) == [
        "a.zarr",
        "second.zarr",
    ]
    np.testing.assert_array_equal(store.shared_neurons, [[6, 2], [2, 6]])
    assert store.attrs["dataset"] == "real"
    sim = DatasetStore(work / "results" / "sim" / "data.zarr")
    assert len(sim.neuron_ids) == 20
    for ds in ("real", "sim"):
        assert (work / "results" / ds / "figures" / "coverage.png").stat().st_size > 10_000
        assert (work / "logs" / ds / "assemble_store.log").exists()
    assert not (REPO / "results" / "real").exists()  # nothing written beside the Snakefile
    # the stitched LDS output contract (README): model, latents, metrics, figures
    fit = work / "results" / "sim" / "stitched_lds" / "n2"
    model = zarr.open_group(str(fit / "model.zarr"), mode="r")
    assert model["C"].shape == (20, 2) and model["A"].shape == (2, 2)
    assert model["R"].shape == (20,) and model["X"].shape == (5, 2, 2)
    assert model["recordings/s2/mean"].shape == (12,)
    latents = zarr.open_group(str(fit / "latents.zarr"), mode="r")
    assert latents["recordings/s1/mean"].shape == (1500, 2)
    assert latents["recordings/s1/var"].shape == (1500, 2)
    metrics = json.loads((fit / "metrics.json").read_text())
    assert len(metrics["covariance"]["heldout"]) == 5
    assert metrics["summary"]["never_corr_vs_truth"] > 0.8  # the true dimension recovers
    figures = work / "results" / "sim" / "figures" / "stitched_lds"
    for name in ("n1_loss", "n2_covariance", "n2_eigenvalues", "n2_latents", "dimension"):
        assert (figures / f"{name}.png").stat().st_size > 10_000
    assert (work / "results" / "real" / "stitched_lds" / "n2" / "metrics.json").exists()
    # the same config and data give the same data and the same fitted model
    first_C = np.asarray(model["C"][:])
    first_y = sim.activity("s1").compute()
    again = run_snakemake(
        work,
        "--forcerun",
        "simulate",
        "ingest",
        "fit_stitched_lds",
        "--",
        "results/sim/stitched_lds/n2/metrics.json",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fit_stitched_lds" in again.stdout + again.stderr  # it did run again
    again_store = DatasetStore(work / "results" / "sim" / "data.zarr")
    np.testing.assert_array_equal(again_store.activity("s1").compute(), first_y)
    again_model = zarr.open_group(str(fit / "model.zarr"), mode="r")
    np.testing.assert_array_equal(np.asarray(again_model["C"][:]), first_C)
    check_report(work)


def report_items(path: Path) -> tuple[str, dict[str, str]]:
    """The landing page's text and every report item's decoded content (text items only) of a
    Snakemake HTML report, read from the data the report embeds."""
    import base64
    import re

    text = path.read_text()
    decoder = json.JSONDecoder()
    desc, _ = decoder.raw_decode(text[re.search(r"workflow_desc\s*=\s*", text).end() :])
    results, _ = decoder.raw_decode(text[re.search(r"results\s*=\s*(?=\{\")", text).end() :])
    items = {}
    for key, entry in results.items():
        if entry["mime_type"] == "text/html":
            items[key] = base64.b64decode(entry["data_uri"].split(",", 1)[1]).decode()
    return desc, {**items, **{k: "" for k in results if k not in items}}


def check_report(work: Path) -> None:
    """The report, built by a Python that sees the runtime dependencies alone (as after
    ``pip install -e .``), carries each dataset's summary, the provenance with the
    configuration and software versions, and the score tables with the chosen dimension."""
    import torch
    from runtime_only import runtime_only_python

    python = runtime_only_python(work.parent / "runtime_only", REPO / "src")
    proc = run_snakemake(work, "--report", "results/report.html", python=python)
    assert proc.returncode == 0, proc.stderr[-3000:]
    desc, items = report_items(work / "results" / "report.html")
    # the landing page sends the reader to each dataset's summary, which gives the choice
    assert "Start with Summary" in desc
    summary = items["results/sim/summary.html"]
    assert "chosen n =" in summary and "stitch validation" in summary
    prov = items["results/sim/provenance.html"]
    assert "sha256" in prov and torch.__version__ in prov and "snakemake" in prov
    assert "latent_dims" in prov and "max_passes" in prov  # the configuration as it ran
    real = items["results/real/provenance.html"]
    assert "data/a.npz" in real and "second" in real
    scores = items["results/sim/stitched_lds/scores.html"]
    assert "held-out rel. error" in scores and "chosen n =" in scores and "converged" in scores
    assert scores.count("<tr>") == 3  # the header and one row per n
    assert "results/sim/figures/stitched_lds/dimension.png" in items
    choice = json.loads((work / "results" / "sim" / "stitched_lds" / "dimension.json").read_text())
    assert choice["chosen"] in (1, 2) and choice["dims"] == [1, 2]


@pytest.mark.slow
def test_nplds_workflow_contract_and_reproducibility(tmp_path):
    work = tmp_path / "project"
    sim = {
        "model": "poisson_trials",
        "n_neurons": 12,
        "latent_dim": 2,
        "n_trials": 30,
        "n_bins": 40,
        "drift_sigma2": 0.3,
        "drift_tau": 8.0,
        "eig_moduli": [0.5, 0.7],
    }
    write_config(
        work,
        {
            "drifting": {
                "simulate": {**sim, "seed": 1, "dynamics_drift_scale": 0.2},
                "models": ["nplds"],
                "nplds": {"latent_dims": [1, 2], "dynamics_drift": True, "max_iter": 40},
            },
            "plain": {
                "simulate": {**sim, "seed": 2},
                "models": ["nplds"],
                "nplds": {"latent_dims": [2], "max_iter": 40, "heldout_trials": 0.1},
            },
        },
    )
    proc = run_snakemake(work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = work / "results" / "drifting"
    for name in ("nplds", "plds", "nplds_dynamics"):
        model = zarr.open_group(str(res / name / "k2" / "model.zarr"), mode="r")
        assert model["C"].shape == (12, 2) and model["d"].shape == (12,)
        assert model["A"].shape == (2, 2) and model["Q"].shape == (2, 2)
        assert model["h_mean"].shape == (30, 2) and model["h_var"].shape == (30, 2)
        np.testing.assert_array_equal(model["trial_ids"][:], np.arange(30))
        assert int(np.sum(model["heldout"][:])) == 6
        assert model["sigma2"].shape == (2,) and model["tau"].shape == (2,)
        latents = zarr.open_group(str(res / name / "k2" / "latents.zarr"), mode="r")
        assert latents.attrs["model"] == name and latents.attrs["latent_dim"] == 2
        (rec,) = latents["recordings"].group_keys()  # the one recording of trials
        mean, var = latents[f"recordings/{rec}/mean"], latents[f"recordings/{rec}/var"]
        assert mean.shape == var.shape == (30, 40, 2)
        no_latents = ~np.isfinite(mean[:][:, 0, 0])  # the held-out trials have none
        np.testing.assert_array_equal(no_latents, model["heldout"][:])
        assert "x_mean" not in model  # one layout: latents live in latents.zarr
        desc = MODELS[name]  # what the NWB export reads: all written
        wanted = {*desc.dynamics, *(c.array for c in desc.per_neuron + desc.per_trial)}
        assert wanted <= set(model.array_keys()), wanted - set(model.array_keys())
    plds = zarr.open_group(str(res / "plds" / "k2" / "model.zarr"), mode="r")
    assert not np.any(plds["sigma2"][:]) and not np.any(plds["h_mean"][:])
    dyn = zarr.open_group(str(res / "nplds_dynamics" / "k1" / "model.zarr"), mode="r")
    assert dyn["A_trials"].shape == (30, 1, 1) and dyn["g_mean"].shape == (30,)
    metrics = json.loads((res / "nplds" / "k2" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"nplds", "plds", "nplds_dynamics"}
    for entry in metrics["models"].values():
        for key in (
            "heldout_trial_bits_per_spike",
            "cosmoothing_bits_per_spike",
            "rate_rmse_hz",
            "bound_trace",
        ):
            assert entry[key] is not None, key
        assert np.all(np.diff(entry["bound_trace"]) >= -1e-9 * abs(entry["bound_trace"][-1]))
    assert metrics["models"]["nplds"]["drift_corr_vs_truth"] > 0.5
    figures = res / "figures" / "nplds"
    for name in ("k1_bound", "k2_drift", "k2_rates", "k2_eigenvalues", "dimension"):
        assert (figures / f"{name}.png").stat().st_size > 10_000
    scores = (res / "nplds" / "scores.html").read_text()
    assert "held-out trials bits/spike" in scores and "chosen k =" in scores
    choice = json.loads((res / "nplds" / "dimension.json").read_text())
    assert choice["chosen"] in (1, 2) and choice["dims"] == [1, 2]
    assert "trials" in (res / "provenance.html").read_text()
    for entry in metrics["models"].values():
        assert entry["stop"] in ("converged", "max_iter") and entry["iterations"] <= 40
    plain = work / "results" / "plain"
    assert not (plain / "nplds_dynamics").exists()
    assert not (plain / "figures" / "nplds" / "k2_eigenvalues.png").exists()
    assert (plain / "figures" / "nplds" / "k2_rates.png").exists()
    # the same config and data give the same fit
    first_C = np.asarray(zarr.open_group(str(res / "nplds" / "k2" / "model.zarr"))["C"][:])
    again = run_snakemake(
        work, "--forcerun", "fit_nplds_dynamics", "--", "results/drifting/nplds/k2/metrics.json"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fit_nplds_dynamics" in again.stdout + again.stderr
    again_C = zarr.open_group(str(res / "nplds" / "k2" / "model.zarr"), mode="r")["C"][:]
    np.testing.assert_array_equal(np.asarray(again_C), first_C)


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
    assert "Traceback" not in out  # a user's error is told in its own words
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


def test_editing_a_neuron_ids_file_reingests(tmp_path, rng):
    """The ids file is an input of the ingest rule: editing it reruns ingest, and the store
    takes the new ids."""
    wd = tmp_path / "wd"
    (wd / "data").mkdir(parents=True)
    np.savez(
        wd / "data" / "a.npz", activity=rng.random((40, 3)), neuron_ids=np.arange(3), rate_hz=10.0
    )
    (wd / "data" / "ids.txt").write_text("x\ny\nz\n")
    rec = {"path": "data/a.npz", "name": "a", "neuron_ids": "data/ids.txt"}
    write_config(wd, {"ds": {"recordings": [rec], "models": ["stitched_lds"]}})
    first = run_snakemake(wd, "results/ds/data.zarr")
    assert first.returncode == 0, first.stderr[-2000:]
    (wd / "data" / "ids.txt").write_text("p\nq\nr\n")
    again = run_snakemake(wd, "results/ds/data.zarr")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "rule ingest" in again.stdout + again.stderr
    assert DatasetStore(wd / "results" / "ds" / "data.zarr").neuron_ids.tolist() == ["p", "q", "r"]


@pytest.mark.slow
def test_a_killed_run_resumes_its_fit_after_unlock_and_rerun_incomplete(tmp_path):
    """SIGKILL Snakemake (and its job) during a fit: after --unlock, --rerun-incomplete
    finishes the fit from its checkpoint (the README's 'When a run is interrupted')."""
    import signal
    import time

    wd = tmp_path / "wd"
    sim = two_recording_simulation(120, 6, (80, 50), 12000)
    fit = {"latent_dims": [6], "lags": 8, "device": "cpu", "tol": 1e-9, "max_passes": 400}
    write_config(wd, {"big": {"simulate": sim, "stitched_lds": fit}})
    target = "results/big/stitched_lds/n6/metrics.json"
    out = wd / "results" / "big" / "stitched_lds" / "n6"
    cmd = [
        *SNAKEMAKE,
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(wd),
        "--configfile",
        str(wd / "config.yaml"),
        "--cores",
        "2",
        target,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "smk.err", "w"),
        start_new_session=True,
    )
    t = time.perf_counter()
    while not (out / "checkpoint" / "fit.ckpt").exists() and time.perf_counter() - t < 300:
        assert proc.poll() is None, (tmp_path / "smk.err").read_text()[-2000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and the job with it
    proc.wait()
    assert (out / "checkpoint" / "fit.ckpt").exists() and not (out / "metrics.json").exists()
    locked = run_snakemake(wd, target)
    assert locked.returncode != 0  # the README's first step: unlock
    assert run_snakemake(wd, "--unlock").returncode == 0
    again = run_snakemake(wd, "--rerun-incomplete", target)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (wd / "logs" / "big" / "fit_stitched_lds_n6.log").read_text()
    assert "resuming from the checkpoint" in log
    assert (out / "metrics.json").exists() and not (out / "checkpoint").exists()


def test_adding_a_recording_ingests_only_that_one(tmp_path, rng):
    """One ingest job per recording: a recording added to the config is ingested alone, the
    others' parts are kept, and the store is assembled again from all of them."""
    wd = tmp_path / "wd"
    (wd / "data").mkdir(parents=True)
    for name, ids in (("a", ["p", "q", "r"]), ("b", ["q", "r", "s"]), ("c", ["s", "t", "p"])):
        np.savez(
            wd / "data" / f"{name}.npz",
            activity=rng.random((40, 3)),
            neuron_ids=np.array(ids),
            rate_hz=10.0,
        )
    recs = [{"path": f"data/{n}.npz"} for n in "abc"]
    write_config(wd, {"ds": {"recordings": recs[:2], "models": ["stitched_lds"]}})
    first = run_snakemake(wd, "results/ds/data.zarr")
    assert first.returncode == 0, first.stderr[-2000:]
    part_a = wd / "results" / "ds" / "recordings" / "a.zarr" / "zarr.json"
    kept = part_a.stat().st_mtime_ns
    write_config(wd, {"ds": {"recordings": recs, "models": ["stitched_lds"]}})
    again = run_snakemake(wd, "results/ds/data.zarr")
    assert again.returncode == 0, again.stderr[-2000:]
    log = again.stdout + again.stderr
    assert log.count("rule ingest:") == 1 and "recordings/c.zarr" in log
    assert "rule assemble_store:" in log
    assert part_a.stat().st_mtime_ns == kept
    store = DatasetStore(wd / "results" / "ds" / "data.zarr")
    assert store.recording_names == ["a", "b", "c"]
    assert store.neuron_ids.tolist() == ["p", "q", "r", "s", "t"]
