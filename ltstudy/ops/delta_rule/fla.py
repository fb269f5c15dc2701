"""Our gated delta rule on flash-linear-attention's Triton kernels (package fla-core, module `fla`).

Same inputs and results as the torch forms in `chunk.py`, mapped as in `ltstudy.ops.gla.fla`
(dims 1 and 2 swapped for fla's [B, T, H, D]; state [K, V] in float32 both ways; q, k, v and β
in one dtype, g in float32). fla's recurrence is ours: the state decays by exp(g_t) first, then
the delta correction β_t k_t (v_t - k_tᵀ S)ᵀ reads the decayed state, and o_t = scale · q_tᵀ S_t.
Our model L2-normalises q and k itself, so fla's in-kernel normalisation stays off.

Imported only where fla is installed (`ltstudy.ops.backend.library` checks before the dispatch
in `__init__.py` imports it).
"""

from __future__ import annotations

import torch
from fla.ops import gated_delta_rule as fla_gdn
from torch import Tensor

from ltstudy.ops.backend import compute_dtype
from ltstudy.ops.gla.fla import fla_state, to_fla


def _inputs(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> list[Tensor]:
    dtype = compute_dtype(q, k, v)
    return [*to_fla(q, k, v, beta, dtype=dtype), *to_fla(g, dtype=torch.float32)]


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunkwise on fla's `chunk_gated_delta_rule` (g and β: [B, H, T] -> [B, T, H])."""
    q, k, v, beta, g = _inputs(q, k, v, g, beta)
    o, S = fla_gdn.chunk_gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=fla_state(state),
        output_final_state=True,
        use_qk_l2norm_in_kernel=False,
    )
    return o.transpose(1, 2), S


def recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token by token (the decode step) on fla's `fused_recurrent_gated_delta_rule`, which has
    no backward (fla raises NotImplementedError): inference only."""
    q, k, v, beta, g = _inputs(q, k, v, g, beta)
    o, S = fla_gdn.fused_recurrent_gated_delta_rule(
        q,
        k,
        v,
        g=g,
        beta=beta,
        scale=scale,
        initial_state=fla_state(state),
        output_final_state=True,
        use_qk_l2norm_in_kernel=False,
    )
    return o.transpose(1, 2), S
