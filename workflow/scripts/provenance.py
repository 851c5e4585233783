"""Snakemake script: a dataset's provenance page for the report (write_provenance)."""

from poplds._logging import setup_job
from poplds.report import write_provenance

setup_job(snakemake.log[0])  # noqa: F821
write_provenance(
    snakemake.input.store,  # noqa: F821
    snakemake.input.metrics,  # noqa: F821
    snakemake.params.config,  # noqa: F821
    snakemake.output.html,  # noqa: F821
)
