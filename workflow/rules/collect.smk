# Gather per-run Parquet files into results/<table>.parquet, one fixed schema per table.


rule collect_table:
    input:
        lambda wildcards: [
            run_file(run_id, wildcards.table) for run_id in runs_with(TABLE_STAGE[wildcards.table])
        ],
    output:
        f"{RESULTS}/{{table}}.parquet",
    resources:
        **LOCAL_RESOURCES,
    run:
        from ltstudy.results.collect import collect_table

        collect_table(wildcards.table, input, output[0])


rule collect_runs:
    input:
        # every run file, through the tables built from them: listing the run files again
        # would add one DAG edge per file (a tenth of a 10,000-run dry run)
        [f"{RESULTS}/{table}.parquet" for table in RUN_FILES],
    output:
        f"{RESULTS}/runs.parquet",
    params:
        hashes={run_id: s["config_hash"] for run_id, s in RUNS.items()},
    resources:
        **LOCAL_RESOURCES,
    run:
        from ltstudy.results.collect import collect_runs

        collect_runs(RUNS, f"{RESULTS}/train_curves.parquet", output[0])


for _study in sorted({s["study"] for s in RUNS.values()}):

    rule:
        name:
            f"study_{_study}"
        input:
            lambda wildcards, study=_study: run_outputs(study),
