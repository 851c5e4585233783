# Stage 1: simulated data (demo, tests), ingest of each recording, and the dataset store.


rule simulate:
    output:
        directory("results/{dataset}/simulated"),
    params:
        settings=simulate_params,
    log:
        "logs/{dataset}/simulate.log",
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/simulate.py"


# one job per recording, each into its own part store (so a cluster ingests them in parallel)
rule ingest:
    input:
        recording_inputs,
    output:
        directory("results/{dataset}/recordings/{recording}.zarr"),
    params:
        ingest=ingest_params,
    log:
        "logs/{dataset}/ingest_{recording}.log",
    threads: 2
    resources:
        mem_mb=ingest_mem_mb,
        runtime=ingest_runtime,
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/ingest.py"


# the dataset store from its parts: neuron table, coverage, the parts' chunks hard-linked
rule assemble_store:
    input:
        recording_parts,
    output:
        directory("results/{dataset}/data.zarr"),
    log:
        "logs/{dataset}/assemble_store.log",
    resources:
        mem_mb=2000,
        runtime=15,
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/assemble_store.py"


rule coverage_figure:
    input:
        "results/{dataset}/data.zarr",
    output:
        report(
            "results/{dataset}/figures/coverage.png",
            caption="../report/coverage.rst",
            category="Data",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "coverage"},
        ),
    log:
        "logs/{dataset}/coverage_figure.log",
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/plot_coverage.py"


rule provenance:
    input:
        store="results/{dataset}/data.zarr",
        metrics=lambda wc: fit_metrics(wc.dataset),
    output:
        html=report(
            "results/{dataset}/provenance.html",
            caption="../report/provenance.rst",
            category="Data",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "provenance"},
        ),
    params:
        config=lambda wc: dataset_config(wc.dataset),
    log:
        "logs/{dataset}/provenance.log",
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/provenance.py"
