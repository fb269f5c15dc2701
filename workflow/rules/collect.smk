# Gather per-run Parquet files into results/<table>.parquet, one fixed schema per table.


rule collect_table:
    input:
        lambda wildcards: [
            run_file(run_id, wildcards.table) for run_id in runs_with(TABLE_STAGE[wildcards.table])
        ],
    output:
        f"{RESULTS}/{{table}}.parquet",
    run:
        from ltstudy.results.collect import collect_table

        collect_table(wildcards.table, input, output[0])


rule collect_runs:
    input:
        run_outputs(),
    output:
        f"{RESULTS}/runs.parquet",
    params:
        hashes={run_id: s["config_hash"] for run_id, s in RUNS.items()},
    run:
        from ltstudy.results.collect import collect_runs

        collect_runs(RUNS, output[0])


for _study in sorted({s["study"] for s in RUNS.values()}):

    rule:
        name:
            f"study_{_study}"
        input:
            run_outputs(_study),
