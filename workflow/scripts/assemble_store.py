"""Snakemake script: the dataset store from its recordings' parts (poplds.assemble_dataset)."""

from poplds import assemble_dataset
from poplds._logging import setup_job

setup_job(snakemake.log[0])  # noqa: F821
assemble_dataset(
    list(snakemake.input),  # noqa: F821
    snakemake.output[0],  # noqa: F821
    dataset=snakemake.wildcards.dataset,  # noqa: F821
)
