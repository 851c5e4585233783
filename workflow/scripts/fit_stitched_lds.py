"""Snakemake script: fit a stitched LDS to a dataset store (poplds.stitched.fit_store)."""

from poplds._logging import setup_job
from poplds.stitched import StitchedOutputs, StitchedSettings, fit_store

setup_job(snakemake.log[0], snakemake.threads)  # noqa: F821
fit_store(
    snakemake.input.store,  # noqa: F821
    int(snakemake.wildcards.n),  # noqa: F821
    StitchedSettings.from_config(snakemake.params.settings),  # noqa: F821
    outputs=StitchedOutputs.from_mapping(snakemake.output),  # noqa: F821
    truth=snakemake.params.truth or None,  # noqa: F821
    checkpoints=snakemake.params.checkpoints,  # noqa: F821
)
