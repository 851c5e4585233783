"""Snakemake script: the stitched LDS scores table and choice of n (write_stitched_scores)."""

from poplds._logging import setup_job
from poplds.report import write_stitched_scores

setup_job(snakemake.log[0])  # noqa: F821
write_stitched_scores(
    snakemake.input.metrics,  # noqa: F821
    snakemake.output.html,  # noqa: F821
    snakemake.output.csv,  # noqa: F821
    snakemake.output.choice,  # noqa: F821
)
