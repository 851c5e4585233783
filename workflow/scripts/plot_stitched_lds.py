"""Snakemake script: the figures of one stitched LDS fit (poplds.stitched.plots.make_figures)."""

from poplds._logging import setup_job
from poplds.stitched.plots import make_figures

setup_job(snakemake.log[0])  # noqa: F821
make_figures(
    snakemake.input.model,  # noqa: F821
    snakemake.input.latents,  # noqa: F821
    snakemake.input.sample,  # noqa: F821
    dict(snakemake.output.items()),  # noqa: F821
    truth=snakemake.params.truth or None,  # noqa: F821
)
