"""Snakemake script: the coverage figure of a dataset store (poplds.plots.plot_coverage)."""

from poplds._logging import setup_job
from poplds.plots import plot_coverage

setup_job(snakemake.log[0])  # noqa: F821
plot_coverage(snakemake.input[0], snakemake.output[0])  # noqa: F821
