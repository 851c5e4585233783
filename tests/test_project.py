"""The project's own files agree with each other: dependencies, documented config keys, lint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import REPO

# conda-forge names of PyPI packages that differ
CONDA_NAMES = {"torch": "pytorch"}


def _names(specs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ]", s, maxsplit=1)[0].strip().lower() for s in specs}


def test_conda_env_lists_the_same_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pip = {CONDA_NAMES.get(n, n) for n in _names(project["dependencies"])}
    env = yaml.safe_load((REPO / "envs" / "poplds.yaml").read_text())
    conda = _names([d for d in env["dependencies"] if isinstance(d, str)]) - {"python"}
    assert pip == conda


def _schema_keys(node, out: set[str]) -> set[str]:
    if isinstance(node, dict):
        for key, sub in node.get("properties", {}).items():
            out.add(key)
            _schema_keys(sub, out)
        for value in node.values():
            _schema_keys(value, out)
    elif isinstance(node, list):
        for value in node:
            _schema_keys(value, out)
    return out


def test_every_config_key_is_in_the_readme():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    readme = (REPO / "README.md").read_text()
    keys = _schema_keys(schema, set())
    assert {"recordings", "bin_size_s", "trial_window", "neuropil_coefficient"} <= keys
    missing = sorted(k for k in keys if f"`{k}`" not in readme and k != "datasets")
    assert not missing, f"config keys not documented in README.md: {missing}"


def test_readme_starts_with_the_two_commands():
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block and "make test" in first_block
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


def test_no_absolute_paths_of_a_machine():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    pattern = re.compile(r"(/home/\w|/root/|/work/main|/Users/\w|[A-Z]:\\\\Users)")
    hits = []
    for name in tracked:
        path = REPO / name
        if path.suffix in {".png", ".npz", ".npy", ".nwb"} or not path.is_file():
            continue
        for i, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if pattern.search(line) and "test_project.py" not in name:
                hits.append(f"{name}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff_is_clean(args):
    beside = Path(sys.executable).with_name("ruff")
    ruff = str(beside) if beside.exists() else shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff not installed")
    proc = subprocess.run([ruff, *args], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
