"""Gated delta rule (Gated DeltaNet): one entry per op.

The torch forms in `chunk.py` are the reference, run on the CPU and under context parallelism;
on a GPU flash-linear-attention's Triton kernels (`fla.py`) take the same inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ltstudy.ops import backend
from ltstudy.ops.delta_rule import chunk

if TYPE_CHECKING:
    from ltstudy.parallel.context import ContextParallel


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    state: Tensor | None = None,
    chunk_size: int = 64,
    context: ContextParallel | None = None,
    kernels: str = "reference",
) -> tuple[Tensor, Tensor]:
    """(output, final state); one token with no context is a decode step (the recurrent form)."""
    step = q.shape[2] == 1 and context is None
    if context is None and backend.library(kernels, q, "fla", "fla-core"):
        from ltstudy.ops.delta_rule import fla

        run = fla.recurrent_gated_delta_rule if step else fla.chunk_gated_delta_rule
        return run(q, k, v, g, beta, scale, state)
    if step:
        return chunk.recurrent_gated_delta_rule(q, k, v, g, beta, scale, state)
    return chunk.chunk_gated_delta_rule(q, k, v, g, beta, scale, state, chunk_size, context)
