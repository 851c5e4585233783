"""Snakemake script: fit the Poisson LDS models over trials (poplds.nplds.fit_store)."""

from poplds._logging import setup_job
from poplds.nplds import NPLDSOutputs, NPLDSSettings, fit_store

setup_job(snakemake.log[0], snakemake.threads)  # noqa: F821
settings = NPLDSSettings.from_config(snakemake.params.settings)  # noqa: F821
fit_store(
    snakemake.input.store,  # noqa: F821
    int(snakemake.wildcards.k),  # noqa: F821
    settings,
    outputs=NPLDSOutputs.from_mapping(snakemake.output, settings.models),  # noqa: F821
    truth=snakemake.params.truth or None,  # noqa: F821
    checkpoints=snakemake.params.checkpoints,  # noqa: F821
)
