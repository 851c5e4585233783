# Helpers, wildcard constraints and config validation shared by all rules.
import os
import re
import sys
from pathlib import Path

from snakemake.utils import validate

validate(config, workflow.source_path("../schemas/config.schema.yaml"), set_default=True)

# Scripts import poplds from this checkout's src/ (also under --sdm conda, where the
# environment holds the dependencies only); so does this file, for the model list.
_SRC = str(Path(workflow.basedir) / "src")
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_SRC] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
sys.path.insert(0, _SRC)
from poplds._outputs import poisson_models  # noqa: E402 - after the path is set


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


def recording_name(entry):
    """A recording's name in the store: its ``name``, else the file's stem (the folder's name
    for a suite2p plane), as poplds.RecordingSpec.display_name gives it."""
    if entry.get("name"):
        return entry["name"]
    path = Path(entry["path"])
    return path.name if path.is_dir() else path.stem


def recording_names(dataset):
    """The dataset's recording names in configuration order (distinct: each is one job)."""
    names = {}
    for entry in recording_entries(dataset):
        name = recording_name(entry)
        if name in names:
            raise ValueError(
                f"dataset {dataset}: {entry['path']}: recording name {name!r} is also used by "
                f"{names[name]}; give each recording a distinct 'name'"
            )
        names[name] = entry["path"]
    return list(names)


def recording_entry(wildcards):
    """The config entry of one recording of a dataset."""
    for entry in recording_entries(wildcards.dataset):
        if recording_name(entry) == wildcards.recording:
            return entry
    raise ValueError(f"dataset {wildcards.dataset} has no recording {wildcards.recording!r}")


def recording_inputs(wildcards):
    """Every file the ingest of one recording reads: its source and neuron_ids file (a
    simulated dataset's folder of npz files)."""
    if is_simulated(wildcards.dataset):
        return f"results/{wildcards.dataset}/simulated"
    entry = recording_entry(wildcards)
    # the neuron_ids file too: editing it re-ingests the recording
    return [entry["path"]] + ([entry["neuron_ids"]] if "neuron_ids" in entry else [])


def ingest_params(wildcards):
    """The slice of config that the ingest of one recording depends on."""
    ds = dataset_config(wildcards.dataset)
    return {
        "recording": recording_entry(wildcards),
        "bin_size_s": ds["bin_size_s"],
        "trials": ds["trials"] or (is_simulated(wildcards.dataset)
                                   and ds["simulate"]["model"] == "poisson_trials"),
        "trial_window": ds["trial_window"],
        "trial_crop": ds["trial_crop"],
        "chunk_mb": ds["chunk_mb"],
        "codec": ds["codec"],
    }


def recording_parts(wildcards):
    """The ingested recordings (one part store each) that make up a dataset's store."""
    return [
        f"results/{wildcards.dataset}/recordings/{name}.zarr"
        for name in recording_names(wildcards.dataset)
    ]


# ------------------------------------------------------------------ cluster resources
# Sized from what each job reads, so that small jobs ask a scheduler for little and fits for
# what their data need. Callables taking `input` are evaluated when the job is submitted,
# once its inputs exist. A profile's set-resources overrides any of them.


def _size_mb(paths):
    """MB of the files under these paths (folders counted whole)."""
    total = 0
    for p in map(Path, paths):
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        elif p.exists():
            total += p.stat().st_size
    return total / 1e6


def _activity_mb(store):
    """MB of a dataset store's activity as float32 in memory (from the arrays' metadata)."""
    import json

    total = 0
    for meta in Path(store).glob("recordings/*/activity/zarr.json"):
        shape = json.loads(meta.read_text())["shape"]
        n = 1
        for s in shape:
            n *= s
        total += 4 * n
    return total / 1e6


def ingest_mem_mb(wildcards, input):
    # dask streams chunk by chunk; an NWB units table is binned in memory
    return int(2000 + 3 * _size_mb(input))


def ingest_runtime(wildcards, input):
    return int(min(1440, 15 + _size_mb(input) / 1000))  # minutes: a minute per GB read


def stitched_mem_mb(wildcards, input):
    # on the CPU, up to 4 GB of data are held in memory and the rest streamed from the store;
    # the checks (stitch validation, bootstrap) add the atoms' and the replicates' lagged
    # sums, each held within the fit's moment budget (at most 1 GB each on the CPU)
    checks = stitched_config(wildcards.dataset)
    extra = 2000 if checks["bootstrap"] or checks["validation_fraction"] else 0
    return int(3000 + extra + 1.5 * min(_activity_mb(input.store), 4000))


def stitched_runtime(wildcards, input):
    return int(min(1440, 30 + _activity_mb(input.store) / 100))


def nplds_mem_mb(wildcards, input):
    # per-trial posteriors over k latents for every bin, for each model fitted
    return int(3000 + 20 * _activity_mb(input.store))


def nplds_runtime(wildcards, input):
    return int(min(1440, 30 + 2 * _activity_mb(input.store)))


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
    out = {k: v for k, v in cfg.items() if k != "latent_dims"}
    if out.get("validation_keep") is None:  # the same validation pairs for every n
        out["validation_keep"] = max(cfg["latent_dims"]) + 2
    return out


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


def nwb_recordings(dataset):
    """The recordings whose latents are written back as NWB (export_nwb: auto takes those read
    from NWB files)."""
    mode = dataset_config(dataset)["export_nwb"]
    if mode is False or mode == "false":
        return []
    entries = recording_entries(dataset)
    if mode == "auto":
        entries = [e for e in entries if str(e["path"]).lower().endswith(".nwb")]
    return [recording_name(e) for e in entries]


def nplds_models(dataset):
    """The Poisson models one nplds job fits (each gets its own results folder)."""
    return list(poisson_models(dataset in NPLDS_DYNAMICS))


def nplds_fit_outputs(dynamics_drift):
    """A fit_nplds job's model.zarr and latents.zarr of every Poisson model it fits."""
    out = {}
    for m in poisson_models(dynamics_drift):
        out[m] = directory(f"results/{{dataset}}/{m}/k{{k}}/model.zarr")
        out[f"{m}_latents"] = directory(f"results/{{dataset}}/{m}/k{{k}}/latents.zarr")
    return out


def nwb_outputs(dataset):
    """Every NWB file of latents the workflow writes for a dataset."""
    names = nwb_recordings(dataset)
    out = []
    if "stitched_lds" in dataset_config(dataset)["models"]:
        out += [
            f"results/{dataset}/stitched_lds/n{n}/nwb/{name}.nwb"
            for n in stitched_dims(dataset)
            for name in names
        ]
    if "nplds" in dataset_config(dataset)["models"]:
        out += [
            f"results/{dataset}/{model}/k{k}/nwb/{name}.nwb"
            for model in nplds_models(dataset)
            for k in nplds_dims(dataset)
            for name in names
        ]
    return out


def nwb_mem_mb(wildcards, input):
    return int(2000 + 3 * _size_mb([input.model, input.latents]))


def summary_inputs(dataset):
    """Each fitted family's dimension.json and metrics.json files."""
    out = {}
    if "stitched_lds" in dataset_config(dataset)["models"]:
        out["stitched_choice"] = f"results/{dataset}/stitched_lds/dimension.json"
        out["stitched_metrics"] = [
            f"results/{dataset}/stitched_lds/n{n}/metrics.json" for n in stitched_dims(dataset)
        ]
    if "nplds" in dataset_config(dataset)["models"]:
        out["nplds_choice"] = f"results/{dataset}/nplds/dimension.json"
        out["nplds_metrics"] = [
            f"results/{dataset}/nplds/k{k}/metrics.json" for k in nplds_dims(dataset)
        ]
    return out


def all_outputs():
    """Every result the workflow makes by default."""
    out = []
    for ds in DATASETS:
        out += [
            f"results/{ds}/data.zarr",
            f"results/{ds}/figures/coverage.png",
            f"results/{ds}/provenance.html",
            f"results/{ds}/summary.html",
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
        out += nwb_outputs(ds)
    return out


# recording names of every dataset (checked distinct within each dataset here, at parse time)
wildcard_constraints:
    recording=dataset_pattern(sorted({name for ds in DATASETS for name in recording_names(ds)})),
