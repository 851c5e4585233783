"""Snakemake script: the figures of one stitched LDS fit (poplds.stitched.plots.make_figures)."""

from pathlib import Path

from poplds._logging import setup_logging
from poplds.stitched.plots import make_figures

setup_logging(snakemake.log[0])  # noqa: F821
truth = snakemake.input.get("truth")  # noqa: F821
make_figures(
    Path(snakemake.input.model).parent,  # noqa: F821
    dict(snakemake.output.items()),  # noqa: F821
    truth=Path(truth) / "truth.npz" if truth else None,
)
