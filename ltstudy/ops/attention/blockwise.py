"""Causal and sliding-window softmax attention on [batch, heads, time, head_dim] tensors.

`sliding_window_attention` is the blockwise fast form: memory O(T * W) instead of O(T^2).
`naive_sliding_window_attention` is its reference (a dense T x T mask). A query at position i
sees keys i - window + 1 ... i, i.e. flash-attn's window_size=(window - 1, 0).

`context_attention` is the context-parallel form: this rank's queries against the keys they
see, fetched from the other ranks (all of the earlier spans' for full attention, the Llama 3
recipe; only the window's halo for a sliding window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from ltstudy.parallel.context import ContextParallel


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * n_rep, T, D] for grouped-query attention."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    n_rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1)


def sliding_window_mask(t_q: int, t_k: int, window: int, device=None) -> Tensor:
    """Boolean [t_q, t_k] mask (True = attend) for queries at the last t_q of t_k positions."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    return (k_pos <= q_pos) & (q_pos - k_pos < window)


def naive_sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    mask = sliding_window_mask(q.shape[2], k.shape[2], window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Blockwise sliding-window attention: block i of W queries attends to blocks i-1 and i."""
    B, H, T, D = q.shape
    if window >= T:
        return causal_attention(q, k, v)
    n_rep = H // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    W = window
    n_blocks = -(-T // W)
    pad = n_blocks * W - T
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    qb, kb, vb = (x.view(B, H, n_blocks, W, D) for x in (q, k, v))
    # Block 0 has no predecessor: plain causal attention within the block.
    first = F.scaled_dot_product_attention(qb[:, :, 0], kb[:, :, 0], vb[:, :, 0], is_causal=True)
    # Blocks 1..n-1 see their predecessor and themselves under one shared [W, 2W] mask.
    keys = torch.cat([kb[:, :, :-1], kb[:, :, 1:]], dim=3)
    values = torch.cat([vb[:, :, :-1], vb[:, :, 1:]], dim=3)
    mask = sliding_window_mask(W, 2 * W, W, q.device)
    rest = F.scaled_dot_product_attention(qb[:, :, 1:], keys, values, attn_mask=mask)
    out = torch.cat([first[:, :, None], rest], dim=2).view(B, H, n_blocks * W, D)
    return out[:, :, :T]


def trailing_causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of queries at the last t_q of t_k positions: the mask aligned to the
    bottom right, which CUDA's flash and memory-efficient kernels take without materialising
    it. On the CPU such a mask falls back to the math kernel's [t_q, t_k] scores, so there the
    missing queries go in front as zeros (their outputs dropped) and the causal kernel runs."""
    n_rep = q.shape[1] // k.shape[1]
    if q.device.type == "cpu":
        lead = k.shape[2] - q.shape[2]
        padded = F.pad(q, (0, 0, lead, 0))
        out = F.scaled_dot_product_attention(padded, k, v, is_causal=True, enable_gqa=n_rep > 1)
        return out[:, :, lead:]
    mask = causal_lower_right(q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_rep > 1)


def trailing_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Sliding-window attention of queries at the last t_q of t_k positions: the blockwise form
    with the missing queries as zeros in front (their outputs are dropped)."""
    lead = k.shape[2] - q.shape[2]
    padded = F.pad(q, (0, 0, lead, 0))
    return sliding_window_attention(padded, k, v, window)[:, :, lead:]


def context_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int | None, context: ContextParallel
) -> tuple[Tensor, Tensor]:
    """This rank's queries [B, H, span, D] against every key they see, across ranks; also
    those keys and values ([2, B, Hkv, seen, D]: all earlier spans' and this one's for full
    attention, the window's halo and this span's for a sliding window)."""
    kv = torch.stack([k, v])  # one exchange for both
    if window is None:
        kv = context.gather_spans(kv, dim=3, upto=context.rank)
        return trailing_causal_attention(q, kv[0], kv[1]), kv
    kv = context.with_halo(kv, window - 1, dim=3)
    return trailing_window_attention(q, kv[0], kv[1], window), kv


def attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Softmax attention and the log-sum-exp of each query's scores (at least float32), so partial
    results over disjoint key sets can be merged exactly (`merge_partial`)."""
    n_rep = q.shape[1] // k.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    k, v = repeat_kv(k, n_rep).to(dtype), repeat_kv(v, n_rep).to(dtype)
    scores = (q.to(dtype) @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(dim=-1, keepdim=True)
    return (scores - lse).exp() @ v, lse


def merge_partial(outputs: Tensor, lses: Tensor) -> Tensor:
    """Attention over the union of key sets from each set's output and log-sum-exp, stacked
    on dim 0 (flash-decoding's combine)."""
    total = lses.logsumexp(dim=0)
    return ((lses - total).exp() * outputs).sum(dim=0)
