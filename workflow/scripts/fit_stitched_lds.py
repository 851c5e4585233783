"""Snakemake script: fit a stitched LDS to a dataset store (poplds.stitched.fit_store)."""

from pathlib import Path

from poplds._logging import setup_job
from poplds.stitched import fit_store

setup_job(snakemake.log[0], snakemake.threads)  # noqa: F821
truth = snakemake.input.get("truth")  # noqa: F821
fit_store(
    snakemake.input.store,  # noqa: F821
    Path(snakemake.output.metrics).parent,  # noqa: F821
    latent_dim=int(snakemake.wildcards.n),  # noqa: F821
    truth=Path(truth) / "truth.npz" if truth else None,
    **snakemake.params.settings,  # noqa: F821
)
