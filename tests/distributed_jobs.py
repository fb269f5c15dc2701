"""Functions that tests run as real multi-rank submitit jobs (importable, so the local
executor's task processes can unpickle them)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ltstudy.data.dataset import TokenData
from ltstudy.parallel.distributed import World, joined_world
from ltstudy.parallel.parallelize import canonical_name
from ltstudy.train import (
    _train,
    build_training_model,
    job_layout,
    make_optimizer,
    train,
    train_step,
)


def full_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's consolidated gradient (all ranks must call)."""
    from torch.distributed.tensor import DTensor

    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        full = grad.full_tensor() if isinstance(grad, DTensor) else grad
        grads[canonical_name(name)] = full.detach().clone()
    return grads


def first_gradients(
    spec: Mapping[str, Any], world: World, steps: int = 2
) -> list[dict[str, torch.Tensor]]:
    """The consolidated gradients of a run's first `steps` optimizer steps, through the
    training code (every rank computes them)."""
    layout, share = job_layout(spec, world)
    model = build_training_model(spec, layout, world)
    optimizer = make_optimizer(model, spec["train"])
    data = TokenData.load(spec["data_dir"], "train")
    seen: list[dict[str, torch.Tensor]] = []
    for step in range(steps):
        train_step(
            model,
            optimizer,
            data,
            spec,
            step,
            share,
            world,
            before_update=lambda m: seen.append(full_gradients(m)),
        )
    return seen


def train_and_gradients(
    specs: Sequence[Mapping[str, Any]], hybrid: Sequence[Mapping[str, Any]] = (), steps: int = 2
) -> list[list[dict]]:
    """Train each run to the end (its curve lands in its run folder), then record its first
    steps' gradients, all in one process group. `hybrid` runs only record gradients, with the
    two ranks taken as two nodes of one rank each (HSDP: replicated across them)."""
    with joined_world() as world:
        out = []
        for spec in specs:
            _train(spec, world, None)
            out.append(first_gradients(spec, world, steps))
        as_two_nodes = dataclasses.replace(world, nodes=2)
        out += [first_gradients(spec, as_two_nodes) for spec in hybrid]
        return out


def slow_train(spec: Mapping[str, Any], pause_s: float = 0.2) -> Any:
    """`train` with a pause after each step, so a test can interrupt it at a known step."""
    return train(spec, on_step=lambda step: time.sleep(pause_s))
