# ltstudy: long-context architecture study. See README.md.
from snakemake.utils import min_version

min_version("9.0")

# A config file describes a whole study: config/config.yaml unless --configfile names another,
# which then replaces it (no merging; the demo profile uses config/demo.yaml this way).
# Not `--replace-workflow-config`: Snakemake does not pass that flag on to the job processes.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/collect.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
