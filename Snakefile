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
include: "workflow/rules/summary.smk"


# Light jobs (figures, tables, the report's pages, NWB export: seconds each) run where snakemake
# runs, also with a cluster executor: queueing each of them would take longer than running it.
localrules:
    coverage_figure,
    provenance,
    summary,
    stitched_lds_figures,
    stitched_lds_dimension,
    stitched_lds_scores,
    nplds_figures,
    nplds_eigenvalues,
    nplds_dimension,
    nplds_scores,
    stitched_lds_nwb,
    nplds_nwb,


rule all:
    input:
        all_outputs(),
    default_target: True
