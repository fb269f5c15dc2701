"""Causal and sliding-window softmax attention on [batch, heads, time, head_dim] tensors.

`sliding_window_attention` is the blockwise fast form: memory O(T * W) instead of O(T^2).
`naive_sliding_window_attention` is its reference (a dense T x T mask). A query at position i
sees keys i - window + 1 ... i, i.e. flash-attn's window_size=(window - 1, 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
