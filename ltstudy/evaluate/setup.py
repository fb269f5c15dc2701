"""What every evaluation of a trained run starts with: the model, and the position methods to
evaluate each length with."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ltstudy.device import configure_threads, pick_device
from ltstudy.models.rope import scalings_for_length
from ltstudy.models.variants import VARIANTS
from ltstudy.train import load_trained


def trained_model(spec: Mapping[str, Any]) -> torch.nn.Module:
    """The run's final model on the best device, with the job's CPU threads."""
    configure_threads(spec["resources"]["evaluate"]["cpus_per_task"])
    return load_trained(spec, pick_device())


def position_methods(
    model: torch.nn.Module, spec: Mapping[str, Any], settings: Mapping[str, Any], length: int
) -> Iterator[dict | None]:
    """Set each rope scaling to evaluate `length` with on the model, yielding it: the run's own,
    and beyond the training context the configured extension (RoPE models only)."""
    for scaling in scalings_for_length(
        model.cfg.rope_scaling,
        settings["rope_scaling_beyond_context"],
        spec["context"],
        length,
        VARIANTS[spec["variant"]].rotary,
    ):
        model.set_rope_scaling(scaling)
        yield scaling
