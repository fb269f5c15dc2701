"""LaCT (large-chunk test-time training with SwiGLU fast weights): the chunked op in `chunk.py`;
its elementwise gate math runs in torch (`naive.py`) or in fused Triton kernels (`triton.py`),
as the `kernels` argument and the tensors' device choose (ltstudy.ops.backend)."""

from __future__ import annotations

from ltstudy.ops.lact.chunk import (
    NS_COEFFICIENTS,
    LaCTState,
    Weights,
    initial_state,
    lact,
    lact_reference,
    lact_step,
    newton_schulz,
    row_norms,
    swiglu_apply,
)

__all__ = [
    "NS_COEFFICIENTS",
    "LaCTState",
    "Weights",
    "initial_state",
    "lact",
    "lact_reference",
    "lact_step",
    "newton_schulz",
    "row_norms",
    "swiglu_apply",
]
