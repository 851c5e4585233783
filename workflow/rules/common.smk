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
    k=r"\d+",


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
    """Every file the ingest of a dataset reads: its sources and neuron_ids files (a simulated
    dataset's folder of npz files)."""
    if is_simulated(wildcards.dataset):
        return f"results/{wildcards.dataset}/simulated"
    entries = recording_entries(wildcards.dataset)
    # the neuron_ids files too: editing one re-ingests the dataset
    return [r["path"] for r in entries] + [r["neuron_ids"] for r in entries if "neuron_ids" in r]


def ingest_params(wildcards):
    """The slice of config that the ingest of one dataset depends on."""
    ds = dataset_config(wildcards.dataset)
    return {
        "recordings": recording_entries(wildcards.dataset),
        "bin_size_s": ds["bin_size_s"],
        "trials": ds["trials"] or (is_simulated(wildcards.dataset)
                                   and ds["simulate"]["model"] == "poisson_trials"),
        "trial_window": ds["trial_window"],
        "trial_crop": ds["trial_crop"],
        "chunk_mb": ds["chunk_mb"],
    }


def simulate_params(wildcards):
    return dataset_config(wildcards.dataset)["simulate"]


def truth_input(wildcards):
    """The simulated ground truth's folder (simulated datasets only)."""
    if is_simulated(wildcards.dataset):
        return f"results/{wildcards.dataset}/simulated"
    return []


def truth_file(wildcards):
    """The simulated ground truth inside that folder (rule simulate), or "" for real data."""
    if is_simulated(wildcards.dataset):
        return f"results/{wildcards.dataset}/simulated/truth.npz"
    return ""


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


def nplds_config(dataset):
    """The dataset's nplds block; the schema fills in every default."""
    return dataset_config(dataset)["nplds"]


def nplds_dims(dataset):
    return sorted(set(nplds_config(dataset)["latent_dims"]))


def nplds_params(wildcards):
    """Fit settings (everything but the latent dimensions, which are the wildcard k)."""
    cfg = nplds_config(wildcards.dataset)
    return {k: v for k, v in cfg.items() if k != "latent_dims"}


def dataset_pattern(names):
    """A wildcard constraint matching exactly these dataset names (none: matches nothing)."""
    return "|".join(map(re.escape, names)) if names else "(?!)"


# datasets whose nplds job also fits the drifting-dynamics variant (rule fit_nplds_dynamics)
NPLDS_DYNAMICS = [
    ds
    for ds in DATASETS
    if "nplds" in dataset_config(ds)["models"] and dataset_config(ds)["nplds"]["dynamics_drift"]
]


NPLDS_FIGURES = ("bound", "drift", "rates")


def fit_metrics(dataset):
    """Every fit's metrics.json of a dataset."""
    out = []
    if "stitched_lds" in dataset_config(dataset)["models"]:
        out += [f"results/{dataset}/stitched_lds/n{n}/metrics.json" for n in stitched_dims(dataset)]
    if "nplds" in dataset_config(dataset)["models"]:
        out += [f"results/{dataset}/nplds/k{k}/metrics.json" for k in nplds_dims(dataset)]
    return out


def all_outputs():
    """Every result the workflow makes by default."""
    out = []
    for ds in DATASETS:
        out += [
            f"results/{ds}/data.zarr",
            f"results/{ds}/figures/coverage.png",
            f"results/{ds}/provenance.html",
        ]
        if "stitched_lds" in dataset_config(ds)["models"]:
            for n in stitched_dims(ds):
                out.append(f"results/{ds}/stitched_lds/n{n}/metrics.json")
                out += [
                    f"results/{ds}/figures/stitched_lds/n{n}_{fig}.png" for fig in STITCHED_FIGURES
                ]
            out.append(f"results/{ds}/figures/stitched_lds/dimension.png")
            out.append(f"results/{ds}/stitched_lds/scores.html")
        if "nplds" in dataset_config(ds)["models"]:
            for k in nplds_dims(ds):
                out.append(f"results/{ds}/nplds/k{k}/metrics.json")
                out += [f"results/{ds}/figures/nplds/k{k}_{fig}.png" for fig in NPLDS_FIGURES]
                if nplds_config(ds)["dynamics_drift"]:
                    out.append(f"results/{ds}/figures/nplds/k{k}_eigenvalues.png")
            out.append(f"results/{ds}/figures/nplds/dimension.png")
            out.append(f"results/{ds}/nplds/scores.html")
    return out
