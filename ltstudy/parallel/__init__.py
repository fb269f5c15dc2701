"""Parallelism applied from outside the model, as torchtitan's `parallelize` step does.

The model code stays single-device and plain. A training job joins its process group
(`distributed`), builds the model on the meta device, applies activation checkpointing and
FSDP2 (`parallelize`), then materialises each parameter's shard from a full tensor by name
(`materialize`), so a run's initial weights do not depend on how many ranks it runs on. With
context parallelism the job's ranks form a (data, context) mesh and each context rank holds a
contiguous span of every sequence (`spans`, torch-free); the layers that need what other spans
computed exchange it through the `ContextParallel` of the call (`context`).
"""
