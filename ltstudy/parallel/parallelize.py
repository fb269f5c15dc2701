"""Apply activation checkpointing and FSDP2 to a built model, torchtitan's order: checkpointing
first (it wraps blocks), then FSDP2 per block and on the root."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ltstudy.parallel.distributed import World

CHECKPOINTING = ("none", "full", "selective")
WRAPPED = "_checkpoint_wrapped_module."


@dataclass(frozen=True)
class Layout:
    """How one training job spreads a run over its ranks (what the planner decides)."""

    activation_checkpointing: str = "none"  # none | full (every block) | selective (every other)
    hybrid_shard: bool = False  # shard within a node, replicate across nodes (HSDP)
    param_dtype: str = "fp32"  # compute dtype of FSDP2's gathered parameters (bf16 on GPU)


def canonical_name(name: str) -> str:
    """A parameter's name in the plain model (checkpoint wrappers add a prefix)."""
    return name.replace(WRAPPED, "")


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute blocks in the backward pass instead of keeping their activations: every block
    (`full`) or every other one (`selective`); a checkpointed block keeps only its input."""
    if mode not in CHECKPOINTING:
        raise ValueError(f"activation checkpointing must be one of {CHECKPOINTING}, not {mode!r}")
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for index, block in enumerate(model.layers):
        if mode == "full" or index % 2 == 0:
            model.layers[index] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_fsdp(model: nn.Module, world: World, param_dtype: str, hybrid_shard: bool) -> None:
    """FSDP2: shard each block, then the root (embeddings, final norm, LM head). Gradients are
    reduced in fp32; parameters are gathered in `param_dtype` for compute."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    device_type = world.device.type
    if hybrid_shard and world.nodes > 1:
        mesh = init_device_mesh(
            device_type,
            (world.nodes, world.size // world.nodes),
            mesh_dim_names=("replicate", "shard"),
        )
    else:
        mesh = init_device_mesh(device_type, (world.size,), mesh_dim_names=("shard",))
    dtype = torch.bfloat16 if param_dtype == "bf16" else None
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    last = len(model.layers) - 1
    for index, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by the backward pass.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=index < last)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "token_losses")  # the training entry point


def parallelize(model: nn.Module, layout: Layout, world: World) -> nn.Module:
    """Checkpointing, then FSDP2 when the job has a process group; in place, returns the model."""
    apply_activation_checkpointing(model, layout.activation_checkpointing)
    if world.grouped:
        apply_fsdp(model, world, layout.param_dtype, layout.hybrid_shard)
    return model
