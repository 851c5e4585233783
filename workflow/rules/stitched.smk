# Stage 2: the stitched LDS, one fit per latent dimension, its figures, and the choice of n.


rule fit_stitched_lds:
    input:
        store="results/{dataset}/data.zarr",
        truth=truth_input,
    output:
        model=directory("results/{dataset}/stitched_lds/n{n}/model.zarr"),
        latents=directory("results/{dataset}/stitched_lds/n{n}/latents.zarr"),
        metrics="results/{dataset}/stitched_lds/n{n}/metrics.json",
        sample="results/{dataset}/stitched_lds/n{n}/covariance_sample.npz",
    params:
        settings=stitched_params,
        truth=truth_file,
        # not an output: Snakemake leaves it in place when a job is killed, to resume from
        checkpoints="results/{dataset}/stitched_lds/n{n}/checkpoint",
    log:
        "logs/{dataset}/fit_stitched_lds_n{n}.log",
    threads: 2
    resources:
        mem_mb=stitched_mem_mb,
        runtime=stitched_runtime,
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/fit_stitched_lds.py"


rule stitched_lds_figures:
    input:
        model="results/{dataset}/stitched_lds/n{n}/model.zarr",
        latents="results/{dataset}/stitched_lds/n{n}/latents.zarr",
        sample="results/{dataset}/stitched_lds/n{n}/covariance_sample.npz",
        truth=truth_input,
    params:
        truth=truth_file,
    output:
        loss=report(
            "results/{dataset}/figures/stitched_lds/n{n}_loss.png",
            caption="../report/stitched_loss.rst",
            category="Stitched LDS",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "n": "{n}", "figure": "loss"},
        ),
        covariance=report(
            "results/{dataset}/figures/stitched_lds/n{n}_covariance.png",
            caption="../report/stitched_covariance.rst",
            category="Stitched LDS",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "n": "{n}", "figure": "covariances"},
        ),
        eigenvalues=report(
            "results/{dataset}/figures/stitched_lds/n{n}_eigenvalues.png",
            caption="../report/stitched_eigenvalues.rst",
            category="Stitched LDS",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "n": "{n}", "figure": "eigenvalues"},
        ),
        latents=report(
            "results/{dataset}/figures/stitched_lds/n{n}_latents.png",
            caption="../report/stitched_latents.rst",
            category="Stitched LDS",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "n": "{n}", "figure": "latents"},
        ),
    log:
        "logs/{dataset}/stitched_lds_figures_n{n}.log",
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/plot_stitched_lds.py"


rule stitched_lds_dimension:
    input:
        metrics=lambda wc: expand(
            "results/{dataset}/stitched_lds/n{n}/metrics.json",
            dataset=wc.dataset,
            n=stitched_dims(wc.dataset),
        ),
    output:
        report(
            "results/{dataset}/figures/stitched_lds/dimension.png",
            caption="../report/stitched_dimension.rst",
            category="Stitched LDS",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "n": "all", "figure": "latent dimension"},
        ),
    log:
        "logs/{dataset}/stitched_lds_dimension.log",
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/plot_stitched_dimension.py"


rule stitched_lds_scores:
    input:
        metrics=lambda wc: expand(
            "results/{dataset}/stitched_lds/n{n}/metrics.json",
            dataset=wc.dataset,
            n=stitched_dims(wc.dataset),
        ),
    output:
        html=report(
            "results/{dataset}/stitched_lds/scores.html",
            caption="../report/stitched_scores.rst",
            category="Stitched LDS",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "n": "all", "figure": "scores table"},
        ),
        csv="results/{dataset}/stitched_lds/scores.csv",
        choice="results/{dataset}/stitched_lds/dimension.json",
    log:
        "logs/{dataset}/stitched_lds_scores.log",
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/stitched_scores.py"
