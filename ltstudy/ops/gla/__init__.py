"""Gated linear attention (GLA's gate per key, Mamba2's SSD gate per head): one entry per op.

The torch forms in `chunk.py` are the reference, run on the CPU and under context parallelism;
on a GPU flash-linear-attention's Triton kernels (`fla.py`) take the same inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ltstudy.ops import backend
from ltstudy.ops.gla import chunk

if TYPE_CHECKING:
    from ltstudy.parallel.context import ContextParallel

min_log_decay = chunk.min_log_decay


def gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    state: Tensor | None = None,
    chunk_size: int = 16,
    context: ContextParallel | None = None,
    kernels: str = "reference",
) -> tuple[Tensor, Tensor]:
    """(output, final state) of GLA; g is [B, H, T, K] (per key) or [B, H, T] (per head, SSD).
    One token with no context is a decode step (the recurrent form)."""
    per_head = g.dim() == 3
    step = q.shape[2] == 1 and context is None
    if context is None and backend.library(kernels, q, "fla", "fla-core"):
        from ltstudy.ops.gla import fla

        if step:
            return fla.recurrent_gla(q, k, v, g, scale, state)
        run = fla.chunk_scalar_gla if per_head else fla.chunk_gla
        return run(q, k, v, g, scale, state)
    if step:
        return chunk.recurrent_gla(q, k, v, g, scale, state)
    run = chunk.chunk_scalar_gla if per_head else chunk.chunk_gla
    return run(q, k, v, g, scale, state, chunk_size, context)
