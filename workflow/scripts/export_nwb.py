"""Snakemake script: one recording's latents as an NWB file (poplds.nwb.write_latents_nwb)."""

from poplds._logging import setup_job
from poplds.nwb import write_latents_nwb

setup_job(snakemake.log[0])  # noqa: F821
write_latents_nwb(
    snakemake.input.store,  # noqa: F821
    snakemake.wildcards.recording,  # noqa: F821
    snakemake.params.model,  # noqa: F821
    snakemake.input.model,  # noqa: F821
    snakemake.input.latents,  # noqa: F821
    snakemake.output[0],  # noqa: F821
)
