# Tokenize the corpus (embedded or the user's) into shards with a manifest.
DATA_RESOURCES = CONFIG["defaults"]["resources"]["data"]


rule prepare_data:
    output:
        manifest=f"{DATA_DIR}/manifest.json",
    params:
        data=CONFIG["data"],
    resources:
        slurm_jobs=1,
        **{k: DATA_RESOURCES[k] for k in ("gpu", "nodes", "cpus_per_task", "mem_mb", "runtime")},
    run:
        launch(
            "data",
            {"data": params.data, "data_dir": DATA_DIR},
            label="data",
            work_dir=DATA_DIR,
            outputs=dict(output.items()),
            resources=launcher_resources(resources, DATA_RESOURCES),
            launcher=CONFIG["launcher"],
        )
