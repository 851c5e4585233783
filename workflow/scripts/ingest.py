"""Snakemake script: ingest one recording into its part store (poplds.ingest_recording)."""

from poplds import ingest_recording
from poplds._logging import setup_job

setup_job(snakemake.log[0])  # noqa: F821
settings = dict(snakemake.params.ingest)  # noqa: F821
ingest_recording(settings.pop("recording"), snakemake.output[0], **settings)  # noqa: F821
