# Train one run (resuming from its checkpoint if an earlier attempt was interrupted).


rule train:
    input:
        manifest=run_manifest,
        init=per_job(lambda wildcards: [f"{d}/model.safetensors" for d in [spec(wildcards).get("init_from_dir")] if d]),
    output:
        **outputs_of("train"),
    priority: 3
    params:
        config_hash=from_spec("config_hash"),
    resources:
        **run_resources("train"),
    run:
        launch_run_stage("train", wildcards, output, resources)
