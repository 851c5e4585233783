# The report's front page per dataset: chosen dimensions, the checks of the predictions, warnings.


rule summary:
    input:
        unpack(lambda wc: summary_inputs(wc.dataset)),
    output:
        report(
            "results/{dataset}/summary.html",
            caption="../report/summary.rst",
            category="Summary",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "summary"},
        ),
    log:
        "logs/{dataset}/summary.log",
    conda:
        "../../envs/poplds.yaml"
    script:
        "../scripts/summary.py"
