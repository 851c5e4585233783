# poplds: low-dimensional dynamics of large, partially observed neural populations.
#
#   snakemake --cores all                         # uses ./config.yaml
#   snakemake --cores all --configfile my.yaml    # your datasets
#   snakemake --report results/report.html        # the report, after a run
#
# Output paths under results/<dataset>/ are documented in the README.

from snakemake.utils import min_version

min_version("9.0")

# A --configfile given on the command line replaces the demo config instead of being merged
# into it, so a user's run never picks up the demo datasets.
if not config:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/stitched.smk"
include: "workflow/rules/nplds.smk"
include: "workflow/rules/nwb.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
