"""What every evaluation of a trained run starts with: its ranks, the model, and the position
methods to evaluate each length with; and the two forward passes evaluations make, split over
the ranks (context parallelism) when the job has several.

An evaluation job runs one process per GPU (`resources.evaluate.gpu`). Every rank loads the
whole model and runs the same loop over prompts and windows; each sequence is split over all
of them (`Ranks.split`), so a rank holds a span's activations and decode cache. Rank 0 writes
the tables.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ltstudy.device import configure_threads, pick_device
from ltstudy.models.rope import scalings_for_length
from ltstudy.models.variants import VARIANTS
from ltstudy.parallel.context import ContextParallel
from ltstudy.parallel.distributed import World, joined_world
from ltstudy.parallel.spans import span_multiple, span_problem, split_spans
from ltstudy.train import load_trained


@dataclass(frozen=True)
class Ranks:
    """The evaluation job's processes."""

    world: World

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    def split(self, model: torch.nn.Module, length: int) -> ContextParallel | None:
        """This rank's part of a `length`-token sequence: a span of it, or (one rank, or a
        sequence too short to split) None, the whole sequence."""
        cfg = model.cfg.to_dict()
        if self.world.size == 1 or span_problem(cfg, length, self.world.size):
            return None
        spans = split_spans(length, self.world.size, span_multiple(cfg))
        return ContextParallel(dist.group.WORLD, self.world.rank, spans)


@contextlib.contextmanager
def evaluation_ranks() -> Iterator[Ranks]:
    with joined_world() as world:
        if world.size > 1 and world.is_main:
            print(
                f"[evaluate] {world.size} ranks: each sequence is split over {world.size} "
                "ranks (context parallel), or run whole on each where it is too short to split",
                flush=True,
            )
        yield Ranks(world)


def trained_model(spec: Mapping[str, Any], ranks: Ranks | None = None) -> torch.nn.Module:
    """The run's final model on this rank's device (without ranks: the best one), with the
    job's CPU threads."""
    configure_threads(spec["resources"]["evaluate"]["cpus_per_task"])
    return load_trained(spec, pick_device() if ranks is None else ranks.world.device)


def sequence_losses(
    model: torch.nn.Module, ids: Tensor, labels: Tensor, context: ContextParallel | None
) -> Tensor:
    """Per-token losses [B, T] of whole sequences, on every rank; with a context each rank
    computes its span's and the spans are gathered (a few bytes per token)."""
    if context is None:
        return model.token_losses(ids, labels)
    part = slice(context.offset, context.offset + context.length)
    losses = model.token_losses(ids[:, part], labels[:, part], context=context)
    return context.gather_spans(losses.float(), dim=1).to(losses.dtype)


def prefill_logits(
    model: torch.nn.Module, ids: Tensor, cache: Any, context: ContextParallel | None
) -> Tensor:
    """Run a prompt into an empty decode cache; the logits [B, vocab] at its last position
    only (never the [T, vocab] of the whole prompt), on every rank. With a context each rank
    prefills its span; decoding then goes on with the same tokens on every rank."""
    if context is None:
        return model.logits_at(ids, -1, cache)[:, -1]
    part = ids[:, context.offset : context.offset + context.length]
    hidden = model.hidden_states(part, cache, context)[:, -1:]
    return context.from_last(model.lm_head(hidden)[:, -1], hidden.device)


def _scalings(
    model: torch.nn.Module, spec: Mapping[str, Any], settings: Mapping[str, Any], length: int
) -> list[dict | None]:
    """The rope scalings `length` is evaluated with: the run's own, and beyond the training
    context the configured extension (RoPE models only)."""
    return scalings_for_length(
        model.cfg.rope_scaling,
        settings["rope_scaling_beyond_context"],
        spec["context"],
        length,
        VARIANTS[spec["variant"]].rotary,
    )


def position_methods(
    model: torch.nn.Module, spec: Mapping[str, Any], settings: Mapping[str, Any], length: int
) -> Iterator[dict | None]:
    """Set each rope scaling of `_scalings` on the model, yielding it."""
    for scaling in _scalings(model, spec, settings, length):
        model.set_rope_scaling(scaling)
        yield scaling


def count_points(
    model: torch.nn.Module, spec: Mapping[str, Any], settings: Mapping[str, Any]
) -> int:
    """How many (length, rope scaling) points `position_methods` gives over all of
    settings["lengths"]: the total of an evaluation's progress."""
    return sum(len(_scalings(model, spec, settings, n)) for n in settings["lengths"])
