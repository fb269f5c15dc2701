"""Functions that tests run as real multi-rank submitit jobs (importable, so the local
executor's task processes can unpickle them)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ltstudy.data.dataset import TokenData
from ltstudy.parallel.distributed import World, joined_world
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
        grads[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().clone()
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


def train_and_gradients(specs: Sequence[Mapping[str, Any]]) -> list[list[dict]]:
    """Train each run to the end (its curve lands in its run folder), then record its first
    steps' gradients, all in one process group."""
    with joined_world() as world:
        out = []
        for spec in specs:
            _train(spec, world, None)
            out.append(first_gradients(spec, world))
        return out


def slow_train(spec: Mapping[str, Any], pause_s: float = 0.2) -> Any:
    """`train` with a pause after each step, so a test can interrupt it at a known step."""
    return train(spec, on_step=lambda step: time.sleep(pause_s))
