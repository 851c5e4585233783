"""The shipped SLURM profile against a live one-node SLURM (tests/slurm/cluster.sh): the demo
runs through ``snakemake --profile`` with the executor plugin, edited only where a user edits
it (the GPU partition's name), and gives the outputs of a local run.

Part of ``make test`` (about 4.5 minutes on 2 cores, beside the other tests). Skipped, with the
reason in pytest's summary, where SLURM cannot be installed or started (not root, no apt-get, a
machine that already runs SLURM), where the executor plugin is missing, or with
``POPLDS_SLURM_TEST=0``.
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
from conftest import REPO, assert_same_store

from poplds._results import json_leaves

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
    """A copy of the demo config in a fresh working directory, its grids of latent
    dimensions cut (the test is about where the jobs run and that they agree, not about the
    choice: that keeps it to a few minutes on two cores)."""
    root.mkdir(parents=True)
    text = (REPO / "config.yaml").read_text()
    for old, new in (("latent_dims: [2, 4, 6] ", "latent_dims: [2, 4]    "),
                     ("latent_dims: [1, 2, 3, 4] ", "latent_dims: [2]          ")):  # fmt: skip
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (root / "config.yaml").write_text(text)
    return root


def _slurm_job(jobid: str) -> dict[str, str]:
    """SLURM's record of one job (``scontrol show job -d``; the test cluster keeps finished
    jobs for an hour)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-d", "-o", jobid], capture_output=True, text=True, check=True
    ).stdout
    record = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    record.setdefault("TresPerNode", "")
    return record


def _same_json(a: Path, b: Path) -> None:
    la, lb = (
        dict(json_leaves(json.loads(a.read_text()))),
        dict(json_leaves(json.loads(b.read_text()))),
    )
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


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("POPLDS_SLURM_TEST") == "0", reason="POPLDS_SLURM_TEST=0: SLURM test not run"
)
def test_demo_runs_on_slurm_through_the_shipped_profile(cluster, tmp_path):
    slurm, local = _project(tmp_path / "slurm"), _project(tmp_path / "local")
    common = ["-s", str(REPO / "Snakefile")]
    # the user's one edit: the GPU partition's name (the account stays unset: this cluster
    # keeps no accounting, like many small ones)
    profile = slurm / "profile"
    shutil.copytree(REPO / "profiles" / "slurm", profile)
    text = (profile / "config.yaml").read_text()
    assert text.count('slurm_partition: "gpu"') == 3
    (profile / "config.yaml").write_text(
        text.replace('slurm_partition: "gpu"', 'slurm_partition: "gpuq"')
    )
    # OpenMP threads that sleep instead of spinning while they wait: the two runs share the
    # cores, and spinning threads of one slow the other several-fold (results are the same)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
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
        env=env,
    )
    try:
        # the local reference meanwhile, at a lower priority: the SLURM run mostly waits
        ref = subprocess.run(
            [*SNAKEMAKE, *common, "--directory", str(local), "--cores", "2"],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
            preexec_fn=lambda: os.nice(15),
        )
        out, _ = on_slurm.communicate(timeout=1200)
    finally:
        if on_slurm.poll() is None:  # Snakemake cancels its SLURM jobs on SIGTERM
            on_slurm.terminate()
            on_slurm.wait(60)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert on_slurm.returncode == 0, out[-5000:]
    assert "executor: slurm" in out.lower() or "slurm run id" in out.lower()

    # the cluster's jobs went through sbatch, and SLURM ran them as the profile asked: the
    # fits in the GPU partition with one GPU, the rest small in the default partition; the
    # light jobs (figures, tables, NWB export) ran where snakemake ran (localrules)
    jobs = {}
    for log in (slurm / ".snakemake" / "slurm_logs").rglob("*.log"):
        rule = next(p for p in log.parts if p.startswith("rule_")).removeprefix("rule_")
        jobs.setdefault(rule, []).append(_slurm_job(log.stem))
    assert set(jobs) == {
        "simulate",
        "ingest",
        "assemble_store",
        "fit_stitched_lds",
        "fit_nplds_dynamics",
    }
    assert len(jobs["ingest"]) == 4  # one job per recording: 3 + 1
    for rule, records in jobs.items():
        for job in records:
            assert job["JobState"] == "COMPLETED", (rule, job)
            if rule.startswith("fit_"):
                assert job["Partition"] == "gpuq" and "gpu:1" in job["TresPerNode"], (rule, job)
            else:
                assert job["Partition"] == "main" and "gpu" not in job["TresPerNode"], (rule, job)
    small = jobs["simulate"][0]
    assert "mem=2000M" in small["TRES"] and small["TimeLimit"] == "00:15:00", small

    # the same outputs as the local run
    res_s, res_l = slurm / "results", local / "results"
    files_s = sorted(p.relative_to(res_s) for p in res_s.rglob("*") if p.is_file())
    files_l = sorted(p.relative_to(res_l) for p in res_l.rglob("*") if p.is_file())
    assert files_s == files_l
    for ds in ("demo_stitched", "demo_trials"):
        # the same but for the absolute source paths of two folders
        assert_same_store(res_s / ds / "data.zarr", res_l / ds / "data.zarr", ("source",))
    metrics = [p for p in files_l if p.name == "metrics.json" or p.name == "dimension.json"]
    assert len(metrics) >= 5  # n = 2, 4; k = 2; a dimension.json per dataset
    for rel in metrics:
        _same_json(res_s / rel, res_l / rel)
    from poplds.nwb import read_latents_nwb

    for rel in (p for p in files_l if p.suffix == ".nwb"):
        model = rel.parts[1]
        a, b = read_latents_nwb(res_s / rel, model), read_latents_nwb(res_l / rel, model)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=str(rel))
