"""Parallelism applied from outside the model, as torchtitan's `parallelize` step does.

The model code stays single-device and plain. A training job joins its process group
(`world`), builds the model on the meta device, applies activation checkpointing and FSDP2
(`parallelize`), then materialises each parameter's shard from a full tensor by name
(`materialize`), so a run's initial weights do not depend on how many ranks it runs on.
"""

from ltstudy.parallel.distributed import World, init_world
from ltstudy.parallel.parallelize import Layout, parallelize

__all__ = ["Layout", "World", "init_world", "parallelize"]
