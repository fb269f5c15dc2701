# Evaluate one run: perplexity and passkey on its trained model, throughput on random weights.


rule perplexity:
    input:
        model=rules.train.output.model,
        manifest=run_manifest,
    output:
        table=f"{RUN_DIR}/perplexity.parquet",
    priority: 2
    params:
        settings=lambda wildcards: spec(wildcards)["evaluate"]["perplexity"],
    resources:
        **run_resources("evaluate"),
    run:
        launch_run_stage("perplexity", wildcards, output, resources)


rule passkey:
    input:
        model=rules.train.output.model,
    output:
        table=f"{RUN_DIR}/passkey.parquet",
    priority: 2
    params:
        settings=lambda wildcards: spec(wildcards)["evaluate"]["passkey"],
    resources:
        **run_resources("evaluate"),
    run:
        launch_run_stage("passkey", wildcards, output, resources)


rule throughput:
    output:
        table=f"{RUN_DIR}/throughput.parquet",
    params:
        settings=lambda wildcards: spec(wildcards)["evaluate"]["throughput"],
        model=lambda wildcards: spec(wildcards)["model"],
    resources:
        **run_resources("evaluate"),
    run:
        launch_run_stage("throughput", wildcards, output, resources)
