"""Our GLA ops on flash-linear-attention's Triton kernels (package fla-core, module `fla`).

Same inputs and results as the torch forms in `chunk.py`: [B, H, T, D] tensors, a log decay
g (<= 0), `scale` multiplying q, state [B, H, K, V]. The mapping onto fla, shared by every op:

- fla's tensors are [B, T, H, D]: each op swaps dims 1 and 2 on the way in and out (fla makes
  its inputs contiguous itself);
- fla's state is [K, V] too (its default, state_v_first=False), held in float32: the initial
  state goes in as float32 (fla's chunk form asserts it) and the final state comes back float32,
  so a decode cache keeps full precision from step to step;
- fla's dots need one dtype on both sides, so q, k, v go in as `backend.compute_dtype`; the
  gate goes in as float32, the precision of fla's cumulative sums of it.

Imported only where fla is installed (`ltstudy.ops.backend.library` checks before the dispatch
in `__init__.py` imports it).
"""

from __future__ import annotations

import torch
from fla.ops import gla as fla_gla
from fla.ops import simple_gla as fla_simple_gla
from torch import Tensor

from ltstudy.ops.backend import compute_dtype


def to_fla(*xs: Tensor, dtype: torch.dtype) -> list[Tensor]:
    """[B, H, T, ...] -> fla's [B, T, H, ...] in `dtype`."""
    return [x.transpose(1, 2).to(dtype) for x in xs]


def fla_state(state: Tensor | None) -> Tensor | None:
    """fla's initial state: float32."""
    return None if state is None else state.float()


def chunk_gla(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """GLA with a gate per key (g: [B, H, T, K]) on fla's `chunk_gla`, whose gate is the same
    per-key log decay applied before the write (S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ)."""
    dtype = compute_dtype(q, k, v)
    (g,) = to_fla(g, dtype=torch.float32)
    o, S = fla_gla.chunk_gla(
        *to_fla(q, k, v, dtype=dtype),
        g,
        scale=scale,
        initial_state=fla_state(state),
        output_final_state=True,
    )
    return o.transpose(1, 2), S


def chunk_scalar_gla(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One gate per head (g: [B, H, T], Mamba2's SSD) on fla's `chunk_simple_gla`, whose g is
    the same per-head log decay ([B, T, H] there)."""
    dtype = compute_dtype(q, k, v)
    (g,) = to_fla(g, dtype=torch.float32)
    o, S = fla_simple_gla.chunk_simple_gla(
        *to_fla(q, k, v, dtype=dtype),
        g=g,
        scale=scale,
        initial_state=fla_state(state),
        output_final_state=True,
    )
    return o.transpose(1, 2), S


def recurrent_gla(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Token by token (the decode step) on fla's fused recurrent kernels: a gate per key
    (g: [B, H, T, K]) is `fused_recurrent_gla`'s `gk`, one per head (g: [B, H, T]) is
    `fused_recurrent_simple_gla`'s `g`; both decay the state before the write, as ours does."""
    dtype = compute_dtype(q, k, v)
    (g,) = to_fla(g, dtype=torch.float32)
    inputs = to_fla(q, k, v, dtype=dtype)
    options = {"scale": scale, "initial_state": fla_state(state), "output_final_state": True}
    if g.dim() == 3:
        o, S = fla_simple_gla.fused_recurrent_simple_gla(*inputs, g=g, **options)
    else:
        o, S = fla_gla.fused_recurrent_gla(*inputs, gk=g, **options)
    return o.transpose(1, 2), S
