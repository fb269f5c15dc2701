"""Sliding-window and document-masked causal attention on FlexAttention: the GPU fast path.

Why: FlexAttention compiles the mask into one fused Triton kernel, and its block mask lets that
kernel skip every 128 x 128 tile the mask rules out, so a window of W costs O(T * W) work with
no [W, 2W] key copies (the blockwise torch form's), and packed documents never attend across
their boundaries at no extra cost.

Limits: the kernel is compiled on CUDA only; elsewhere flex runs eagerly, which materialises the
T x T scores (for tests) and has no backward on the CPU. Kernel and block masks are specialised
to the sequence length: each new length compiles again (pytorch#141486); the recompile limit
is raised to 64 lengths, past which dynamo would fall back to the slow eager form.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from ltstudy.ops.backend import compute_dtype

_compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
# One graph per sequence length: an evaluation over a dozen lengths must not exhaust dynamo's
# default of 8 and fall back to eager flex, which materialises the T x T scores.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
# Eager create_block_mask materialises the T x T mask first (pytorch#134756); compiled it does not.
_compiled_create_block_mask = torch.compile(create_block_mask)


def sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, document_ids: Tensor | None = None
) -> Tensor:
    """Query i sees keys i - window + 1 ... i, only of its own document when `document_ids`
    ([B, T] int on q's device: each token's document in a packed sequence) is given."""
    return _attention(q, k, v, window, document_ids)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, document_ids: Tensor) -> Tensor:
    """Full causal attention within each document of packed sequences (`document_ids` as in
    `sliding_window_attention`); without documents SDPA's flash kernels are the fast path."""
    return _attention(q, k, v, None, document_ids)


def _attention(
    q: Tensor, k: Tensor, v: Tensor, window: int | None, document_ids: Tensor | None
) -> Tensor:
    t = q.shape[2]
    if document_ids is None:
        block_mask = _window_block_mask(t, window, q.device)
    else:  # depends on the data: built per call
        mask_mod = _mask_mod(window, document_ids)
        block_mask = _block_mask(mask_mod, document_ids.shape[0], t, q.device)
    flex = _compiled_flex_attention if q.is_cuda else flex_attention
    dtype = compute_dtype(q, k, v)  # autocast does not cast flex's inputs (QK-norm gives fp32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return flex(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


def _mask_mod(window: int | None, document_ids: Tensor | None) -> Callable[..., Tensor]:
    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        keep = kv_idx <= q_idx
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        if document_ids is not None:
            keep = keep & (document_ids[b, q_idx] == document_ids[b, kv_idx])
        return keep

    return mask_mod


@lru_cache(maxsize=64)
def _window_block_mask(t: int, window: int, device: torch.device) -> BlockMask:
    return _block_mask(_mask_mod(window, None), None, t, device)


def _block_mask(
    mask_mod: Callable[..., Tensor], batch: int | None, t: int, device: torch.device
) -> BlockMask:
    build = _compiled_create_block_mask if device.type == "cuda" else create_block_mask
    return build(mask_mod, batch, None, t, t, device=device)
