"""In-Place TTT's fast-weight MLP output: one entry, `inplace_ttt`.

`naive.py` is the reference (autograd through the sequential loop), `chunk.py` the torch form
that recomputes instead of storing (the CPU path), `triton.py` the same loop with each chunk's
write fused into one Triton kernel (the GPU path).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ltstudy.ops import backend
from ltstudy.ops.ttt import chunk
from ltstudy.ops.ttt.naive import clip_update, inplace_ttt_reference

__all__ = ["clip_update", "inplace_ttt", "inplace_ttt_reference"]


def inplace_ttt(
    z: Tensor,
    v: Tensor,
    w_down: Tensor,
    *,
    eta: float,
    chunk_size: int,
    clip_tau: float | None = None,
    clip_order: str = "before_eta",
    state: Tensor | None = None,
    kernels: str = "reference",
) -> tuple[Tensor, Tensor]:
    """Fast-weight MLP output for z: [B, T, F] (gated activations), v: [B, T, D] (targets).

    w_down: [D, F] is the slow initial weight; `state` [B, D, F] is what earlier chunks already
    added to it (decoding). Returns (output [B, T, D], state after the last complete chunk; a
    trailing partial chunk's write waits until the chunk is complete). The slow part is a plain
    F.linear and the fast part is added on top, so with v == 0 the output is bit-identical to
    the backbone MLP.
    """
    if backend.use_fast(kernels, z):
        from ltstudy.ops.ttt import triton as fast_form
    else:
        fast_form = chunk
    fast, final = fast_form.fast_weights(z, v, state, eta, chunk_size, clip_tau, clip_order)
    return F.linear(z, w_down) + fast, final
