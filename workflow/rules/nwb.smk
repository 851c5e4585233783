# Stage 4: results back into NWB, one file per fitted model and recording (export_nwb).


rule stitched_lds_nwb:
    input:
        store="results/{dataset}/data.zarr",
        model="results/{dataset}/stitched_lds/n{n}/model.zarr",
        latents="results/{dataset}/stitched_lds/n{n}/latents.zarr",
        source=recording_inputs,
    output:
        "results/{dataset}/stitched_lds/n{n}/nwb/{recording}.nwb",
    params:
        model="stitched_lds",
    log:
        "logs/{dataset}/stitched_lds_nwb_n{n}_{recording}.log",
    resources:
        mem_mb=nwb_mem_mb,
        runtime=15,
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/export_nwb.py"


rule nplds_nwb:
    input:
        store="results/{dataset}/data.zarr",
        model="results/{dataset}/{model}/k{k}/model.zarr",
        latents="results/{dataset}/{model}/k{k}/latents.zarr",
        source=recording_inputs,
    output:
        "results/{dataset}/{model}/k{k}/nwb/{recording}.nwb",
    params:
        model=lambda wc: wc.model,
    wildcard_constraints:
        model="|".join(poisson_models(True)),
    log:
        "logs/{dataset}/{model}_nwb_k{k}_{recording}.log",
    resources:
        mem_mb=nwb_mem_mb,
        runtime=15,
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/export_nwb.py"
