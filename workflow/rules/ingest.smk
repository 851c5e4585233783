# Stage 1: simulated data (demo, tests) and ingest of recordings into the dataset store.


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


rule ingest:
    input:
        ingest_inputs,
    output:
        directory("results/{dataset}/data.zarr"),
    params:
        ingest=ingest_params,
    log:
        "logs/{dataset}/ingest.log",
    threads: 2
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/ingest.py"


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
