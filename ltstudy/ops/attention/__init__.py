"""Softmax attention, causal or in a sliding window: one entry, `attention`.

Full attention is torch SDPA everywhere (flash / cuDNN kernels on a GPU). A sliding window runs
the blockwise torch form (`blockwise.py`, also the context-parallel forms) or, on the fast path
on a GPU, FlexAttention with a sliding-window block mask (`flex.py`).
"""

from __future__ import annotations

from torch import Tensor

from ltstudy.ops import backend
from ltstudy.ops.attention.blockwise import (
    attention_with_lse,
    causal_attention,
    context_attention,
    merge_partial,
    naive_sliding_window_attention,
    repeat_kv,
    sliding_window_attention,
    sliding_window_mask,
    trailing_causal_attention,
    trailing_window_attention,
)

__all__ = [
    "attention",
    "attention_with_lse",
    "causal_attention",
    "context_attention",
    "merge_partial",
    "naive_sliding_window_attention",
    "repeat_kv",
    "sliding_window_attention",
    "sliding_window_mask",
    "trailing_causal_attention",
    "trailing_window_attention",
]


def attention(
    q: Tensor, k: Tensor, v: Tensor, window: int | None, kernels: str = "reference"
) -> Tensor:
    """Causal attention of all of q against all of k (same length), windowed or not."""
    if window is None or window >= q.shape[2]:
        return causal_attention(q, k, v)
    if backend.use_fast(kernels, q) and q.is_cuda:  # FlexAttention has no CPU backward
        from ltstudy.ops.attention import flex

        return flex.sliding_window_attention(q, k, v, window)
    return sliding_window_attention(q, k, v, window)
