"""Snakemake script: write a simulated dataset (poplds.simulate.write_simulation)."""

from poplds._logging import setup_job
from poplds.simulate import write_simulation

setup_job(snakemake.log[0])  # noqa: F821
write_simulation(snakemake.output[0], snakemake.params.settings)  # noqa: F821
