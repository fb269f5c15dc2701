"""Softmax attention mixer: RoPE, grouped-query heads, optional QK-norm and sliding window.

One class serves `full`, `swa` and `hybrid` (which gives every `full_every`-th layer full
attention and the others the window). The decode cache keeps keys and values in preallocated
buffers, written in place: all of them for full attention, the last window - 1 for a sliding
window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltstudy.models.config import ModelConfig
from ltstudy.models.layers import RMSNorm, apply_rotary
from ltstudy.ops.attention import (
    attention,
    attention_with_lse,
    context_attention,
    merge_partial,
    sliding_window_mask,
)
from ltstudy.parallel.context import ContextParallel

if TYPE_CHECKING:
    from ltstudy.models.transformer import Cache


def layer_window(cfg: ModelConfig, layer_idx: int) -> int | None:
    """The attention window of a layer (None = full attention)."""
    full_every = cfg.mixer.get("full_every")
    if full_every and (layer_idx + 1) % full_every == 0:
        return None
    return cfg.swa_window


def reserve_kv_cache(cache: Cache, tokens: int) -> None:
    """Size the key/value buffers of a model's decode cache for `tokens` in all (prompt + new
    tokens): full-attention layers then allocate them once, at the prefill, and never grow
    them (growing copies the whole cache and briefly holds it twice); other layers ignore it."""
    for layer in cache.layers:
        layer.setdefault("mixer", {})["capacity"] = tokens


def attend_cached(
    q: Tensor, k: Tensor, v: Tensor, window: int | None, cache: dict, kernels: str = "reference"
) -> Tensor:
    """New queries against cached + new keys; keeps what later queries still need.

    Keys and values live in preallocated buffers (cache "k", "v" [B, kv_heads, capacity,
    head_dim]; slots start:end are live) and new ones are written in place, so a decode step
    copies no cache: full attention keeps every key, a sliding window its last window - 1.
    """
    t_new = k.shape[2]
    if cache.get("end", 0) == cache.get("start", 0):  # nothing cached: attend among the new
        keep = t_new if window is None else min(t_new, window - 1)
        _append(cache, k[:, :, t_new - keep :], v[:, :, t_new - keep :], window)
        return attention(q, k, v, window, kernels)
    k, v = _append(cache, k, v, window)
    # A single query (decoding) sees every live key; grouped heads share them, not copied.
    mask = None if t_new == 1 else sliding_window_mask(t_new, k.shape[2], window or k.shape[2])
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] > k.shape[1])
    if window is not None:
        cache["start"] = max(cache["start"], cache["end"] - (window - 1))
    return y


def _append(cache: dict, k: Tensor, v: Tensor, window: int | None) -> tuple[Tensor, Tensor]:
    """Write k, v after the live keys and values; return views of live + new. When the buffers
    are full, the live part moves to new ones: full attention grows them to the reserved
    capacity or geometrically (a copy per doubling), a sliding window leaves room for `window`
    more tokens (its window - 1 keys move once every `window` decode steps)."""
    start, end, t_new = cache.get("start", 0), cache.get("end", 0), k.shape[2]
    held = cache["k"].shape[2] if "k" in cache else 0
    if end + t_new > held:
        live = end - start
        if window is None:
            capacity = max(live + t_new, 2 * held, cache.get("capacity", 0))
        else:
            capacity = live + t_new + window
        for name, new in (("k", k), ("v", v)):
            buffer = new.new_empty(*new.shape[:2], capacity, new.shape[3])
            if live:
                buffer[:, :, :live] = cache[name][:, :, start:end]
            cache[name] = buffer
        start, end = 0, live
    cache["k"][:, :, end : end + t_new] = k
    cache["v"][:, :, end : end + t_new] = v
    cache["start"], cache["end"] = start, end + t_new
    return cache["k"][:, :, start : end + t_new], cache["v"][:, :, start : end + t_new]


def split_prefill_cache(
    cache: dict, k: Tensor, v: Tensor, kv: Tensor, window: int | None, context: ContextParallel
) -> None:
    """The decode cache after a context-parallel prefill (an empty cache). Full attention keeps
    each rank's own span of keys and values where it is (decoding merges the ranks' partial
    results); a window keeps its last window - 1, which on the last rank are the sequence's."""
    if "k" in cache:
        raise ValueError("a context-parallel prefill starts from an empty decode cache")
    if window is None:
        cache.update(k=k, v=v, context=context)
    else:
        keep = min(kv.shape[3], window - 1)
        _append(cache, kv[0, :, :, kv.shape[3] - keep :], kv[1, :, :, kv.shape[3] - keep :], window)


@torch.no_grad()
def attend_sharded(q: Tensor, k: Tensor, v: Tensor, cache: dict) -> Tensor:
    """Decoding against a cache whose keys are spread over the context ranks. The new tokens'
    keys go to a small `tail` held the same on every rank; each rank attends to its own span
    of the prompt (the last one also to the tail, causally) and the partial results are
    merged exactly. Nothing of the prompt's cache is copied."""
    context: ContextParallel = cache["context"]
    if "k_tail" in cache:
        k, v = torch.cat([cache["k_tail"], k], dim=2), torch.cat([cache["v_tail"], v], dim=2)
    cache["k_tail"], cache["v_tail"] = k, v
    out, lse = attention_with_lse(q, cache["k"], cache["v"], None)
    if context.last:
        mask = sliding_window_mask(q.shape[2], k.shape[2], k.shape[2], q.device)
        tail_out, tail_lse = attention_with_lse(q, k, v, mask)
        out = merge_partial(torch.stack([out, tail_out]), torch.stack([lse, tail_lse]))
        lse = torch.stack([lse, tail_lse]).logsumexp(dim=0)
    stacked = context.all_gather(torch.cat([out, lse], dim=-1))
    return merge_partial(stacked[..., :-1], stacked[..., -1:]).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = layer_window(cfg, layer_idx)
        self.kernels = cfg.kernels
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values before rotation, [B, heads, T, head_dim]."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: dict | None,
        context: ContextParallel | None = None,
    ) -> Tensor:
        """Rotate, attend; [B, heads, T, head_dim]. With a context, q, k, v are this rank's
        span and the keys of the other spans are fetched."""
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if context is not None:
            y, kv = context_attention(q, k, v, self.window, context)
            if cache is not None:
                split_prefill_cache(cache, k, v, kv, self.window, context)
            return y
        if cache is not None and "context" in cache:
            return attend_sharded(q, k, v, cache)
        if cache is None:
            return attention(q, k, v, self.window, self.kernels)
        return attend_cached(q, k, v, self.window, cache, self.kernels)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: dict | None = None,
        context: ContextParallel | None = None,
    ) -> Tensor:
        y = self.attention(*self.project(x), rope, cache, context)
        return self.o_proj(y.transpose(1, 2).flatten(2))
