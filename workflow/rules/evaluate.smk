# Evaluate one run: perplexity, passkey, RULER and lm-evaluation-harness tasks on its trained
# model, throughput on random weights.


rule perplexity:
    input:
        model=rules.train.output.model,
        manifest=run_manifest,
    output:
        **outputs_of("perplexity"),
    priority: 2
    params:
        settings=from_spec("evaluate", "perplexity"),
    resources:
        **run_resources("evaluate"),
    run:
        launch_run_stage("perplexity", wildcards, output, resources)


rule passkey:
    input:
        model=rules.train.output.model,
    output:
        **outputs_of("passkey"),
    priority: 2
    params:
        settings=from_spec("evaluate", "passkey"),
    resources:
        **run_resources("evaluate"),
    run:
        launch_run_stage("passkey", wildcards, output, resources)


rule ruler:
    input:
        model=rules.train.output.model,
        manifest=run_manifest,
    output:
        **outputs_of("ruler"),
    priority: 2
    params:
        settings=from_spec("evaluate", "ruler"),
    resources:
        **run_resources("evaluate"),
    run:
        launch_run_stage("ruler", wildcards, output, resources)


rule lm_eval:
    input:
        model=rules.train.output.model,
    output:
        **outputs_of("lm_eval"),
    priority: 2
    params:
        settings=from_spec("evaluate", "lm_eval"),
    resources:
        **run_resources("evaluate"),
    run:
        launch_run_stage("lm_eval", wildcards, output, resources)


# Throughput is measured alone: outside a cluster the rule holds every core Snakemake has, so no
# training or evaluation job shares the machine while it times (on Slurm each job has its node).
rule throughput:
    output:
        **outputs_of("throughput"),
    threads: 1 if CONFIG["launcher"] == "slurm" else workflow.cores
    params:
        settings=from_spec("evaluate", "throughput"),
        model=from_spec("model"),
    resources:
        **run_resources("evaluate"),
    run:
        launch_run_stage("throughput", wildcards, output, resources)
