"""Snakemake script: held-out error against latent dimension (plot_dimension_choice)."""

from poplds._logging import setup_job
from poplds.stitched.plots import plot_dimension_choice

setup_job(snakemake.log[0])  # noqa: F821
plot_dimension_choice(snakemake.input.metrics, snakemake.output[0])  # noqa: F821
