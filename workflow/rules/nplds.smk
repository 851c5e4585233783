# Stage 3: Poisson LDS over trials, stationary (PLDS) and non-stationary (N-PLDS), one job per
# latent dimension k fitting every model on the same training trials; figures; choice of k.


rule fit_nplds:
    input:
        store="results/{dataset}/data.zarr",
        truth=truth_input,
    output:
        **nplds_fit_outputs(dynamics_drift=False),
        metrics="results/{dataset}/nplds/k{k}/metrics.json",
        predictions="results/{dataset}/nplds/k{k}/predictions.npz",
    params:
        settings=nplds_params,
        truth=truth_file,
        # not an output: Snakemake leaves it in place when a job is killed, to resume from
        checkpoints="results/{dataset}/nplds/k{k}/checkpoint",
    wildcard_constraints:
        dataset=dataset_pattern([d for d in DATASETS if d not in NPLDS_DYNAMICS]),
    log:
        "logs/{dataset}/fit_nplds_k{k}.log",
    threads: 2
    resources:
        mem_mb=nplds_mem_mb,
        runtime=nplds_runtime,
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/fit_nplds.py"


# the same job for datasets with nplds.dynamics_drift: true, which also writes the variant
use rule fit_nplds as fit_nplds_dynamics with:
    output:
        **nplds_fit_outputs(dynamics_drift=True),
        metrics="results/{dataset}/nplds/k{k}/metrics.json",
        predictions="results/{dataset}/nplds/k{k}/predictions.npz",
    wildcard_constraints:
        dataset=dataset_pattern(NPLDS_DYNAMICS),


rule nplds_figures:
    input:
        metrics="results/{dataset}/nplds/k{k}/metrics.json",
        predictions="results/{dataset}/nplds/k{k}/predictions.npz",
    output:
        bound=report(
            "results/{dataset}/figures/nplds/k{k}_bound.png",
            caption="../report/nplds_bound.rst",
            category="Poisson LDS over trials",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "k": "{k}", "figure": "bound"},
        ),
        drift=report(
            "results/{dataset}/figures/nplds/k{k}_drift.png",
            caption="../report/nplds_drift.rst",
            category="Poisson LDS over trials",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "k": "{k}", "figure": "modulator"},
        ),
        rates=report(
            "results/{dataset}/figures/nplds/k{k}_rates.png",
            caption="../report/nplds_rates.rst",
            category="Poisson LDS over trials",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "k": "{k}", "figure": "per-trial rates"},
        ),
    log:
        "logs/{dataset}/nplds_figures_k{k}.log",
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/plot_nplds.py"


rule nplds_eigenvalues:
    input:
        metrics="results/{dataset}/nplds/k{k}/metrics.json",
        predictions="results/{dataset}/nplds/k{k}/predictions.npz",
        model="results/{dataset}/nplds_dynamics/k{k}/model.zarr",
    output:
        eigenvalues=report(
            "results/{dataset}/figures/nplds/k{k}_eigenvalues.png",
            caption="../report/nplds_eigenvalues.rst",
            category="Poisson LDS over trials",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "k": "{k}", "figure": "dynamics per trial"},
        ),
    log:
        "logs/{dataset}/nplds_eigenvalues_k{k}.log",
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/plot_nplds.py"


rule nplds_dimension:
    input:
        metrics=lambda wc: expand(
            "results/{dataset}/nplds/k{k}/metrics.json",
            dataset=wc.dataset,
            k=nplds_dims(wc.dataset),
        ),
    output:
        report(
            "results/{dataset}/figures/nplds/dimension.png",
            caption="../report/nplds_dimension.rst",
            category="Poisson LDS over trials",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "k": "all", "figure": "latent dimension"},
        ),
    log:
        "logs/{dataset}/nplds_dimension.log",
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/plot_nplds_dimension.py"


rule nplds_scores:
    input:
        metrics=lambda wc: expand(
            "results/{dataset}/nplds/k{k}/metrics.json",
            dataset=wc.dataset,
            k=nplds_dims(wc.dataset),
        ),
    output:
        html=report(
            "results/{dataset}/nplds/scores.html",
            caption="../report/nplds_scores.rst",
            category="Poisson LDS over trials",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "k": "all", "figure": "scores table"},
        ),
        csv="results/{dataset}/nplds/scores.csv",
        choice="results/{dataset}/nplds/dimension.json",
    log:
        "logs/{dataset}/nplds_scores.log",
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/nplds_scores.py"
