"""The shipped SLURM profile against a live one-node SLURM (tests/slurm/cluster.sh): the demo
runs through ``snakemake --profile`` with the executor plugin, edited only where a user edits
it (the GPU partition's name), and gives the outputs of a local run.

Skipped, with the reason in pytest's summary, where SLURM cannot be installed or started, or
the executor plugin is missing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

#: metrics that measure the run, not the result
TIMINGS = (
    "date",
    "seconds",
    "time",
    "device",
    "host",
    "started",
    "finished",
    "wall",
    "rss",
    "version",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="executor plugin not installed")
    state = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(
        ["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True, timeout=600
    )
    if proc.returncode == 77:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    try:
        yield state
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], timeout=120)
        # the daemons it started are gone
        assert not list(state.glob("*.pid"))


def _project(root: Path) -> Path:
    """A copy of the demo config in a fresh working directory."""
    root.mkdir(parents=True)
    shutil.copy(REPO / "config.yaml", root / "config.yaml")
    return root


def _leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def _same_json(a: Path, b: Path) -> None:
    la, lb = dict(_leaves(json.loads(a.read_text()))), dict(_leaves(json.loads(b.read_text())))
    assert la.keys() == lb.keys(), a
    for key, va in la.items():
        if any(t in key.lower() for t in TIMINGS) or "path" in key or "store" in key:
            continue
        vb = lb[key]
        if isinstance(va, float) and isinstance(vb, float):
            assert (math.isnan(va) and math.isnan(vb)) or va == pytest.approx(
                vb, rel=1e-6, abs=1e-9
            ), f"{a}: {key} {va} != {vb}"
        else:
            assert va == vb, f"{a}: {key} {va!r} != {vb!r}"


def _same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")

    def walk(x, y, where):
        ax, ay = dict(x.attrs), dict(y.attrs)
        ax.pop("source", None), ay.pop("source", None)  # absolute paths of two folders
        assert ax == ay, f"{where}: attributes differ"
        assert sorted(x.array_keys()) == sorted(y.array_keys()), where
        for name in x.array_keys():
            np.testing.assert_array_equal(x[name][...], y[name][...], err_msg=f"{where}/{name}")
        assert sorted(x.group_keys()) == sorted(y.group_keys()), where
        for name in x.group_keys():
            walk(x[name], y[name], f"{where}/{name}")

    walk(ga, gb, str(a))


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("POPLDS_SLURM_TEST"),
    reason="set POPLDS_SLURM_TEST=1 to run the demo on a live SLURM (about 9 min on 2 cores)",
)
def test_demo_runs_on_slurm_through_the_shipped_profile(cluster, tmp_path):
    slurm, local = _project(tmp_path / "slurm"), _project(tmp_path / "local")
    # the user's one edit: the GPU partition's name (the account stays unset: this cluster
    # keeps no accounting, like many small ones)
    profile = slurm / "profile"
    shutil.copytree(REPO / "profiles" / "slurm", profile)
    text = (profile / "config.yaml").read_text()
    assert text.count('slurm_partition: "gpu"') == 3
    (profile / "config.yaml").write_text(
        text.replace('slurm_partition: "gpu"', 'slurm_partition: "gpuq"')
    )
    common = ["-s", str(REPO / "Snakefile")]
    on_slurm = subprocess.Popen(
        [
            *SNAKEMAKE,
            *common,
            "--directory",
            str(slurm),
            "--profile",
            str(profile),
            # poll often: the demo's jobs take seconds (a real cluster keeps the defaults)
            "--slurm-init-seconds-before-status-checks",
            "2",
            "--seconds-between-status-checks",
            "2",
            "--slurm-keep-successful-logs",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # the local reference runs meanwhile (the SLURM run mostly waits on the scheduler)
    ref = subprocess.run(
        [*SNAKEMAKE, *common, "--directory", str(local), "--cores", "2"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    out, _ = on_slurm.communicate(timeout=1200)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert on_slurm.returncode == 0, out[-5000:]
    assert "executor: slurm" in out.lower() or "slurm run id" in out.lower()

    # every job went through sbatch; the fits asked for the GPU partition and a GPU
    logs = slurm / ".snakemake" / "slurm_logs"
    rules = {p.name.removeprefix("rule_") for p in logs.iterdir()}
    assert {"ingest", "assemble_store", "fit_stitched_lds", "fit_nplds_dynamics"} <= rules
    fit_log = next((logs / "rule_fit_stitched_lds").rglob("*.log")).read_text()
    assert "slurm_partition=gpuq" in fit_log and "gres=gpu:1" in fit_log
    ingest_log = next((logs / "rule_ingest").rglob("*.log")).read_text()
    assert "gres=" not in ingest_log and "slurm_partition=gpuq" not in ingest_log

    # the same outputs as the local run
    res_s, res_l = slurm / "results", local / "results"
    files_s = sorted(p.relative_to(res_s) for p in res_s.rglob("*") if p.is_file())
    files_l = sorted(p.relative_to(res_l) for p in res_l.rglob("*") if p.is_file())
    assert files_s == files_l
    for ds in ("demo_stitched", "demo_trials"):
        _same_store(res_s / ds / "data.zarr", res_l / ds / "data.zarr")
    metrics = [p for p in files_l if p.name == "metrics.json" or p.name == "dimension.json"]
    assert len(metrics) >= 8
    for rel in metrics:
        _same_json(res_s / rel, res_l / rel)
    from poplds.nwb import read_latents_nwb

    for rel in (p for p in files_l if p.suffix == ".nwb"):
        model = rel.parts[1]
        a, b = read_latents_nwb(res_s / rel, model), read_latents_nwb(res_l / rel, model)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=str(rel))
