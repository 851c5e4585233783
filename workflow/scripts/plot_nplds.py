"""Snakemake script: figures of one Poisson LDS fit (poplds.nplds.plots.make_figures)."""

from poplds._logging import setup_job
from poplds.nplds.plots import make_figures

setup_job(snakemake.log[0])  # noqa: F821
make_figures(
    snakemake.input.metrics,  # noqa: F821
    snakemake.input.predictions,  # noqa: F821
    dict(snakemake.output.items()),  # noqa: F821
)
