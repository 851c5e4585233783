"""Snakemake script: a dataset's front page for the report (write_summary)."""

from poplds._logging import setup_job
from poplds.summary import write_summary

setup_job(snakemake.log[0])  # noqa: F821
inputs = snakemake.input  # noqa: F821
families = [f for f in ("stitched", "nplds") if hasattr(inputs, f"{f}_choice")]
names = {"stitched": "stitched_lds", "nplds": "nplds"}
write_summary(
    snakemake.wildcards.dataset,  # noqa: F821
    {names[f]: getattr(inputs, f"{f}_choice") for f in families},
    {names[f]: list(getattr(inputs, f"{f}_metrics")) for f in families},
    snakemake.output[0],  # noqa: F821
)
