"""Softmax attention mixer: RoPE, grouped-query heads, optional QK-norm and sliding window.

One class serves `full`, `swa` and `hybrid` (which gives every `full_every`-th layer full
attention and the others the window). The decode cache keeps keys and values: all of them for
full attention, the last window - 1 for a sliding window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltstudy.models.config import ModelConfig
from ltstudy.models.layers import RMSNorm, apply_rotary
from ltstudy.ops.attention import (
    causal_attention,
    repeat_kv,
    sliding_window_attention,
    sliding_window_mask,
)


def layer_window(cfg: ModelConfig, layer_idx: int) -> int | None:
    """The attention window of a layer (None = full attention)."""
    full_every = cfg.mixer.get("full_every")
    if full_every and (layer_idx + 1) % full_every == 0:
        return None
    return cfg.swa_window


def attend(q: Tensor, k: Tensor, v: Tensor, window: int | None) -> Tensor:
    """Causal attention of all of q against all of k (same length), windowed or not."""
    return (
        causal_attention(q, k, v) if window is None else sliding_window_attention(q, k, v, window)
    )


def attend_cached(q: Tensor, k: Tensor, v: Tensor, window: int | None, cache: dict) -> Tensor:
    """New queries against cached + new keys; keeps what later queries still need."""
    if "k" in cache:
        k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
    t_new, t_all = q.shape[2], k.shape[2]
    if t_new == t_all:
        y = attend(q, k, v, window)
    else:
        n_rep = q.shape[1] // k.shape[1]
        mask = sliding_window_mask(t_new, t_all, window or t_all, q.device)
        y = F.scaled_dot_product_attention(
            q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask
        )
    keep = t_all if window is None else min(t_all, window - 1)
    cache["k"], cache["v"] = k[:, :, t_all - keep :], v[:, :, t_all - keep :]
    return y


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = layer_window(cfg, layer_idx)
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
        self, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor], cache: dict | None
    ) -> Tensor:
        """Rotate, attend; [B, heads, T, head_dim]."""
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is None:
            return attend(q, k, v, self.window)
        return attend_cached(q, k, v, self.window, cache)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: dict | None = None) -> Tensor:
        y = self.attention(*self.project(x), rope, cache)
        return self.o_proj(y.transpose(1, 2).flatten(2))
