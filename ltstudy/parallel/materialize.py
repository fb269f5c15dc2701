"""Fill a (possibly sharded, possibly meta) model's parameters from full tensors named as in
the plain model: seeded initialisation, a consolidated checkpoint or a Hugging Face one.

Each rank builds one full tensor at a time and keeps its own shard, so memory holds at most
one full parameter beyond the shards, and the values do not depend on the world size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from ltstudy.parallel.parallelize import canonical_name

# (canonical name, parameter) -> its full value, or None to keep what the parameter holds.
Source = Callable[[str, torch.Tensor], torch.Tensor | None]


def assign_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy `full` into `param`, keeping only this rank's shard when the parameter is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        full = full.to(device=param.device, dtype=param.dtype)
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)


@torch.no_grad()
def materialize(
    model: nn.Module, device: torch.device | str, source: Source, origin: str = "the source"
) -> None:
    """Allocate a meta model on `device` (nothing to do if it is already there) and fill every
    parameter from `source` (`origin` names it in errors). Tied parameters are filled once,
    under their first name."""
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
    for name, param in model.named_parameters():
        full = source(canonical_name(name), param)
        if full is None:
            continue
        if tuple(full.shape) != tuple(param.shape):  # a DTensor reports its global shape
            raise ValueError(
                f"{origin}: {canonical_name(name)} has shape {tuple(full.shape)}, the model "
                f"{tuple(param.shape)}"
            )
        assign_full(param, full)


def full_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, consolidated value) of every parameter, one at a time. Every rank must
    iterate: a sharded parameter is all-gathered when its turn comes."""
    from torch.distributed.tensor import DTensor

    for name, param in model.named_parameters():
        value = param.full_tensor() if isinstance(param, DTensor) else param
        yield canonical_name(name), value.detach()
