"""Snakemake script: held-out bits per spike against k (poplds.nplds.plots.plot_dimension)."""

from poplds._logging import setup_job
from poplds.nplds.plots import plot_dimension

setup_job(snakemake.log[0])  # noqa: F821
plot_dimension(snakemake.input.metrics, snakemake.output[0])  # noqa: F821
