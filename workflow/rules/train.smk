# Train one run (resuming from its checkpoint if an earlier attempt was interrupted).


@per_job
def longest_first(wildcards):
    """Training before evaluation (2), and the runs with the most FLOPs first: a long run
    started last holds the whole study up while the other cores idle."""
    return 3 + TRAIN_SHARE[f"{wildcards.study}/{wildcards.run}"]


rule train:
    input:
        manifest=run_manifest,
        init=per_job(lambda wildcards: [f"{d}/model.safetensors" for d in [spec(wildcards).get("init_from_dir")] if d]),
    output:
        **outputs_of("train"),
    priority: longest_first
    params:
        config_hash=from_spec("config_hash"),
    resources:
        **run_resources("train"),
    run:
        launch_run_stage("train", wildcards, output, resources)
