# ltstudy: long-context architecture study. See README.md.
from snakemake.utils import min_version

min_version("9.0")

# A Snakemake killed with SIGKILL leaves its lock behind. Each run records itself while it holds
# the lock, so that `ltstudy unlock` (which `make demo` runs first) clears a lock only once its
# holder is dead; lock errors name the holder, and a dry run of a locked directory fails.
# A real run (onstart: not a dry run) with `launcher: slurm` first checks, once, that Slurm is
# there and each job has the partition and account the cluster needs; it then records its
# config file, which `ltstudy` commands read when not given one.
if workflow.exec_mode.name == "DEFAULT":  # not in the job processes Snakemake spawns
    from ltstudy.configfile import record_last_config
    from ltstudy.lock import explain_locks, forget_owner, record_owner
    from ltstudy.slurm_check import SlurmCheckError, check_slurm

    explain_locks()

    onstart:
        if CONFIG["launcher"] == "slurm":
            try:
                check_slurm(slurm_jobs_to_submit())
            except SlurmCheckError as err:
                raise WorkflowError(str(err)) from None
        record_last_config(workflow.configfiles)
        record_owner()

    onsuccess:
        forget_owner()

    onerror:
        forget_owner()

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
        lambda wildcards: final_outputs(),  # a function: job processes never list its files
    resources:
        **LOCAL_RESOURCES,
