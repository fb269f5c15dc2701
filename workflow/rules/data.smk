# Tokenize a corpus (embedded or the user's) into shards with a manifest, once per data config.
DATA_RESOURCES = CONFIG["defaults"]["resources"]["data"]


rule prepare_data:
    output:
        manifest=f"{RESULTS}/data/{{data_id}}/manifest.json",
    params:
        data=lambda wildcards: DATA[wildcards.data_id],
    resources:
        slurm_jobs=1,
        **{k: DATA_RESOURCES[k] for k in ("gpu", "nodes", "cpus_per_task", "mem_mb", "runtime")},
    run:
        data_dir = f"{RESULTS}/data/{wildcards.data_id}"
        launch(
            "data",
            {"data": params.data, "data_dir": data_dir},
            label=f"data-{wildcards.data_id}",
            work_dir=data_dir,
            outputs=dict(output.items()),
            resources=launcher_resources(resources, DATA_RESOURCES),
            launcher=CONFIG["launcher"],
        )
