"""Snakemake script: ingest a dataset's recordings into its store (poplds.ingest_dataset)."""

from poplds import ingest_dataset
from poplds._logging import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821
ingest_dataset(
    out=snakemake.output[0],  # noqa: F821
    dataset=snakemake.wildcards.dataset,  # noqa: F821
    **snakemake.params.ingest,  # noqa: F821
)
