# Config validation, the run table, and helpers shared by every rule file.
from pathlib import Path

from snakemake.exceptions import WorkflowError

from ltstudy.config import ConfigError, validate_study
from ltstudy.launch import launch
from ltstudy.results.schemas import RUN_FILES, STAGE_OUTPUTS, TABLE_STAGE, TABLES

try:
    CONFIG, RUNS = validate_study(config, source="config")
except ConfigError as err:
    raise WorkflowError(str(err)) from None

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


def run_manifest(wildcards):
    return f"{spec(wildcards)['data_dir']}/manifest.json"


def run_file(run_id, table):
    return f"{RESULTS}/runs/{run_id}/{RUN_FILES[table]}"


def runs_with(stage, study=None):
    return [
        run_id
        for run_id, s in RUNS.items()
        if stage in s["stages"] and (study is None or s["study"] == study)
    ]


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
    """Snakemake resources of a launched rule, read from each run's resolved config."""

    def value(key):
        return lambda wildcards: spec(wildcards)["resources"][group][key]

    keys = ("gpu", "nodes", "tasks_per_node", "cpus_per_task", "mem_mb", "runtime")
    return {"slurm_jobs": 1, **{k: value(k) for k in keys}}


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
