# Helpers, wildcard constraints and config validation shared by all rules.
import os
import re
from pathlib import Path

from snakemake.utils import validate

validate(config, workflow.source_path("../schemas/config.schema.yaml"), set_default=True)

# Scripts import poplds from this checkout's src/ (also under --sdm conda, where the
# environment holds the dependencies only).
_SRC = str(Path(workflow.basedir) / "src")
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_SRC] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)


# declared so that Snakemake passes it on to cluster jobs
envvars:
    "PYTHONPATH",


DATASETS = list(config["datasets"])


wildcard_constraints:
    dataset="|".join(map(re.escape, DATASETS)),
    n=r"\d+",


def dataset_config(dataset):
    """The validated config block of one dataset."""
    return config["datasets"][dataset]


def is_simulated(dataset):
    return "simulate" in dataset_config(dataset)


def recording_entries(dataset):
    """The recordings of a dataset as config mappings (simulated ones point at the npz files
    the simulate rule writes)."""
    ds = dataset_config(dataset)
    if not is_simulated(dataset):
        return ds["recordings"]
    sim = ds["simulate"]
    names = (
        [r["name"] for r in sim["recordings"]]
        if sim["model"] == "stitched_lds"
        else [sim.get("name", "trials")]
    )
    return [
        {"path": f"results/{dataset}/simulated/{name}.npz", "name": name} for name in names
    ]


def ingest_inputs(wildcards):
    """Source files of a dataset (a simulated dataset's folder of npz files)."""
    if is_simulated(wildcards.dataset):
        return f"results/{wildcards.dataset}/simulated"
    return [r["path"] for r in recording_entries(wildcards.dataset)]


def ingest_params(wildcards):
    """The slice of config that the ingest of one dataset depends on."""
    ds = dataset_config(wildcards.dataset)
    return {
        "recordings": recording_entries(wildcards.dataset),
        "bin_size_s": ds["bin_size_s"],
        "trials": ds["trials"] or (is_simulated(wildcards.dataset)
                                   and ds["simulate"]["model"] == "poisson_trials"),
        "trial_window": ds["trial_window"],
        "chunk_mb": ds["chunk_mb"],
    }


def simulate_params(wildcards):
    return dataset_config(wildcards.dataset)["simulate"]


def truth_input(wildcards):
    """The simulated ground truth's folder (simulated datasets only)."""
    if is_simulated(wildcards.dataset):
        return f"results/{wildcards.dataset}/simulated"
    return []


def stitched_config(dataset):
    """The dataset's stitched_lds block; the schema fills in every default."""
    return dataset_config(dataset)["stitched_lds"]


def stitched_dims(dataset):
    return sorted(set(stitched_config(dataset)["latent_dims"]))


def stitched_params(wildcards):
    """Fit settings (everything but the latent dimensions, which are the wildcard n)."""
    cfg = stitched_config(wildcards.dataset)
    return {k: v for k, v in cfg.items() if k != "latent_dims"}


STITCHED_FIGURES = ("loss", "covariance", "eigenvalues", "latents")


def all_outputs():
    """Every result the workflow makes by default."""
    out = []
    for ds in DATASETS:
        out += [f"results/{ds}/data.zarr", f"results/{ds}/figures/coverage.png"]
        if "stitched_lds" in dataset_config(ds)["models"]:
            for n in stitched_dims(ds):
                out.append(f"results/{ds}/stitched_lds/n{n}/metrics.json")
                out += [
                    f"results/{ds}/figures/stitched_lds/n{n}_{fig}.png" for fig in STITCHED_FIGURES
                ]
            out.append(f"results/{ds}/figures/stitched_lds/dimension.png")
    return out
