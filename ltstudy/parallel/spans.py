"""How a sequence splits over context-parallel ranks (torch-free, so config validation and
the planner can use it): contiguous spans, all but the last a multiple of the model's chunk
size, so every chunkwise op cuts its chunks where it would on one process."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def span_multiple(model: Mapping[str, Any]) -> int:
    """The least common multiple of the chunk sizes of a model's chunkwise ops (1: none)."""
    sizes = [model.get("mixer", {}).get("chunk_size") or 1]
    if model.get("ttt"):
        sizes.append(model["ttt"]["chunk_size"])
    return math.lcm(*sizes)


def split_spans(length: int, degree: int, multiple: int = 1) -> tuple[int, ...]:
    """Contiguous spans of a `length`-token sequence over `degree` ranks: all but the last a
    multiple of `multiple` and as equal as that allows."""
    base = math.ceil(length / degree / multiple) * multiple
    spans = (base,) * (degree - 1) + (length - base * (degree - 1),)
    if spans[-1] <= 0:
        raise ValueError(
            f"a {length}-token sequence cannot be split over {degree} context-parallel ranks "
            f"in spans that are multiples of {multiple} tokens: lower parallel.context"
        )
    return spans


def halo_needed(model: Mapping[str, Any]) -> int:
    """Tokens a span needs from the one before it (a window's keys, a conv's inputs)."""
    needs = [(model.get("swa_window") or 1) - 1, (model.get("mixer", {}).get("conv_size") or 1) - 1]
    ttt = model.get("ttt")
    if ttt and ttt.get("conv_padding") == "causal":
        needs.append(ttt["conv_kernel"] - 1)
    return max(needs)


def span_problem(model: Mapping[str, Any], length: int, degree: int) -> str | None:
    """Why a `length`-token sequence of this model cannot split over `degree` ranks, or None:
    too short for spans of whole chunks, or spans shorter than what crosses them."""
    if degree == 1:
        return None
    try:
        spans = split_spans(length, degree, span_multiple(model))
    except ValueError as err:
        return str(err)
    if min(spans[:-1]) < halo_needed(model):
        return (
            f"spans of {spans[0]} tokens are shorter than the {halo_needed(model)} a span needs "
            "from the one before it (a window or conv): lower parallel.context"
        )
    return None
