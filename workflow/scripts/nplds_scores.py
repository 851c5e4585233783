"""Snakemake script: the Poisson LDS scores table and choice of k (write_nplds_scores)."""

from poplds._logging import setup_job
from poplds.report import write_nplds_scores

setup_job(snakemake.log[0])  # noqa: F821
write_nplds_scores(
    snakemake.input.metrics,  # noqa: F821
    snakemake.output.html,  # noqa: F821
    snakemake.output.csv,  # noqa: F821
    snakemake.output.choice,  # noqa: F821
)
