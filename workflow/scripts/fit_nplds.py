"""Snakemake script: fit the Poisson LDS models over trials (poplds.nplds.fit_store)."""

from pathlib import Path

from poplds._logging import setup_job
from poplds.nplds import fit_store

setup_job(snakemake.log[0], snakemake.threads)  # noqa: F821
truth = snakemake.input.get("truth")  # noqa: F821
fit_store(
    snakemake.input.store,  # noqa: F821
    Path(snakemake.input.store).parent,  # noqa: F821
    int(snakemake.wildcards.k),  # noqa: F821
    truth=Path(truth) / "truth.npz" if truth else None,
    **snakemake.params.settings,  # noqa: F821
)
