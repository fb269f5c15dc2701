# Config validation, the run table, and helpers shared by every rule file.
import atexit
import inspect
import sys
from collections import Counter
from pathlib import Path

from snakemake.common import overwrite_function_params
from snakemake.exceptions import WorkflowError

from ltstudy.config import ConfigError, deep_merge, numbers_as_read, read_yaml, validate_study
from ltstudy.launch import launch
from ltstudy.plan import parameter_counts, train_flops
from ltstudy.results.schemas import RUN_FILES, STAGE_OUTPUTS, TABLE_STAGE, TABLES

try:
    # Snakemake's YAML loader keeps the last of two equal keys and reads 2e-3 as a string:
    # read the files again with ours, which names the duplicate's file and line.
    _read = {}
    for _path in workflow.configfiles:
        _read = deep_merge(_read, read_yaml(_path))
    CONFIG, RUNS = validate_study(numbers_as_read(config, _read), source="config")
except ConfigError as err:
    raise WorkflowError(str(err)) from None

# Each trained run's FLOPs (the planner's count) as a share of the largest: the training order
# (train.smk), computed once rather than per job.
_TRAIN_FLOPS = {
    run_id: train_flops(s, parameter_counts(s["model"])["total"], "none")
    for run_id, s in RUNS.items()
    if "train" in s["stages"]
}
TRAIN_SHARE = {r: f / max(_TRAIN_FLOPS.values()) for r, f in _TRAIN_FLOPS.items()}
RESULTS = CONFIG["results_dir"]
REPORTS = CONFIG["reports_dir"]
# Each distinct data configuration (corpus + tokenizer) is tokenized once, in its own folder.
DATA = {Path(s["data_dir"]).name: s["data"] for s in RUNS.values()}
RUN_DIR = RESULTS + "/runs/{study}/{run}"


wildcard_constraints:
    study="[A-Za-z][A-Za-z0-9_]*",
    run="[^/]+",
    table="|".join(RUN_FILES),
    data_id="[0-9a-f]+",


def per_job(func):
    """Snakemake inspects the signature of an input, params or resources function at every
    call; with 50,000 jobs of about ten functions that was a fifth of a dry run. It reads a
    signature given in advance (snakemake.common.overwrite_function_params) instead."""
    overwrite_function_params(func, inspect.signature(func).parameters)
    return func


@per_job
def spec(wildcards):
    run_id = f"{wildcards.study}/{wildcards.run}"
    if run_id not in RUNS:
        raise WorkflowError(
            f"unknown run {run_id!r}; `ltstudy runs` lists the runs of this config"
        )
    return RUNS[run_id]


def outputs_of(stage):
    """A stage's output files in the run folder pattern (one definition for rules and jobs)."""
    return {name: f"{RUN_DIR}/{file}" for name, file in STAGE_OUTPUTS[stage].items()}


def from_spec(*keys):
    """A params function: the value under `keys` in the job's run spec."""

    @per_job
    def value(wildcards):
        node = spec(wildcards)
        for key in keys:
            node = node[key]
        return node

    return value


@per_job
def run_manifest(wildcards):
    return f"{spec(wildcards)['data_dir']}/manifest.json"


def run_file(run_id, table):
    return f"{RESULTS}/runs/{run_id}/{RUN_FILES[table]}"


# Run ids by stage and by (stage, study), in config order: indexed once, not scanned per call.
RUNS_WITH = {}
for _run_id, _s in RUNS.items():
    for _stage in _s["stages"]:
        RUNS_WITH.setdefault((_stage, None), []).append(_run_id)
        RUNS_WITH.setdefault((_stage, _s["study"]), []).append(_run_id)


def runs_with(stage, study=None):
    return RUNS_WITH.get((stage, study), [])


def run_outputs(study=None):
    return [
        run_file(run_id, table)
        for table, stage in TABLE_STAGE.items()
        for run_id in runs_with(stage, study)
    ]


def final_outputs():
    """Every run's own files as well as the tables and the report: Snakemake only rebuilds a
    deleted intermediate file when a target asks for it, so the run files are targets too."""
    tables = [f"{RESULTS}/{table}.parquet" for table in TABLES]
    return run_outputs() + tables + [f"{REPORTS}/index.html"]


def run_resources(group):
    """Snakemake resources of a launched rule, read from each run's resolved config: a
    constant where every run has the same value (a function costs Snakemake a call per job).
    The work runs in the launched job, so Snakemake's own disk_mb is a constant too: its
    default (twice the input size) would stat every input of every job, even in a dry run."""

    def value(key):
        values = {s["resources"][group][key] for s in RUNS.values()}
        if len(values) == 1 and None not in values:
            return values.pop()
        return per_job(lambda wildcards: spec(wildcards)["resources"][group][key])

    keys = ("gpu", "nodes", "tasks_per_node", "cpus_per_task", "mem_mb", "runtime")
    return {"slurm_jobs": 1, "disk_mb": 1000, **{k: value(k) for k in keys}}


# Rules that run in Snakemake's own process and read a file per run (collect, report, all):
# Snakemake's default mem_mb and disk_mb (from the input size) would stat every per-run file,
# tens of thousands of them, at each (dry) run.
LOCAL_RESOURCES = {"mem_mb": 8000, "disk_mb": 1000}


def launcher_resources(resources, configured):
    """Numbers as Snakemake scheduled them; Slurm strings from the run's config, else the
    profile's default-resources."""
    merged = {k: resources[k] for k in resources.keys() if not k.startswith("_")}
    for key, value in configured.items():
        if value is not None and key not in ("gpu", "nodes", "mem_mb", "runtime"):
            merged[key] = value
    return merged


def launch_run_stage(stage, wildcards, output, resources):
    s = spec(wildcards)
    group = "train" if stage == "train" else "evaluate"
    launch(
        stage,
        s,
        label=s["run_id"],
        work_dir=s["run_dir"],
        outputs=dict(output.items()),
        resources=launcher_resources(resources, s["resources"][group]),
        launcher=CONFIG["launcher"],
    )


def slurm_jobs_to_submit():
    """(job, the partition and account it would be submitted with) of every job of this run
    that submits a Slurm job: what the Snakefile's onstart checks before any is submitted."""
    for job in workflow.dag.needrun_jobs():
        if "slurm_jobs" not in job.resources.keys():
            continue
        if job.rule.name == "prepare_data":
            yield f"prepare_data {job.wildcards.data_id}", launcher_resources(
                job.resources, DATA_RESOURCES
            )
        else:
            group = "train" if job.rule.name == "train" else "evaluate"
            configured = spec(job.wildcards)["resources"][group]
            label = f"{job.rule.name} {job.wildcards.study}/{job.wildcards.run}"
            yield label, launcher_resources(job.resources, configured)


def jobs_per_study(jobs):
    """A table of `jobs` per study (rows) and stage (columns), with totals."""
    counts = {}
    for job in jobs:
        if "study" in job.wildcards.keys():
            counts.setdefault(job.wildcards.study, Counter())[job.rule.name] += 1
    if not counts:
        return ""
    stages = [s for s in STAGE_OUTPUTS if any(c[s] for c in counts.values())]
    header = ["study", *stages, "total"]
    rows = [[study, *(str(c[s]) for s in stages), str(c.total())] for study, c in counts.items()]
    totals = ["total", *(str(sum(c[s] for c in counts.values())) for s in stages)]
    rows.append([*totals, str(sum(c.total() for c in counts.values()))])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))])
        for row in [header, *rows]
    ]
    return "\n".join(["Jobs per study:", lines[0], "-" * len(lines[0]), *lines[1:]])


def print_jobs_per_study():
    """End a dry run with its jobs per study: the profiles' `quiet: [rules]` leave out the
    line per job (thousands in the full study), and Snakemake's own table counts per rule.
    At exit, as Snakemake has no hook after a dry run."""
    dag = getattr(workflow, "dag", None)
    if workflow.dryrun and dag is not None:
        table = jobs_per_study(dag.needrun_jobs(exclude_finished=False))
        if table:
            print(f"\n{table}", file=sys.stderr, flush=True)


if workflow.exec_mode.name == "DEFAULT":
    atexit.register(print_jobs_per_study)
