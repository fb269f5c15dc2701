"""Mamba2 (Dao & Gu, 2024): a selective state space layer computed with SSD.

in_proj gives z (gate), x, B, C and dt; x, B, C pass a short causal conv; the SSM
h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_tᵀ, y_t = C_tᵀ h_t + D x_t is linear attention with one
scalar decay per head (q = C, k = B, v = x·dt, g = A·dt). Output: RMSNorm(y·silu(z))·w per group
of d_inner / n_groups channels (mamba_ssm's RMSNormGated with norm_before_gate=False, the gate
applied before the norm), then out_proj.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltstudy.models.config import ModelConfig
from ltstudy.models.layers import GatedRMSNorm, ShortConv
from ltstudy.ops.gla import gla

if TYPE_CHECKING:
    from ltstudy.parallel.context import ContextParallel


class Mamba2(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        m = cfg.mixer
        self.n_heads, self.head_dim = m["n_heads"], m["head_dim"]
        self.d_state, self.n_groups, self.chunk_size = m["d_state"], m["n_groups"], m["chunk_size"]
        self.d_inner = self.n_heads * self.head_dim
        self.kernels = cfg.kernels
        conv_channels = self.d_inner + 2 * self.n_groups * self.d_state
        self.in_proj = nn.Linear(
            cfg.d_model, self.d_inner + conv_channels + self.n_heads, bias=False
        )
        self.conv = ShortConv(conv_channels, m["conv_size"])
        self.A_log = nn.Parameter(torch.zeros(self.n_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = GatedRMSNorm(
            self.d_inner,
            cfg.norm_eps,
            norm_before_gate=False,
            group_size=self.d_inner // self.n_groups,
        )
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        rope: object = None,
        cache: dict | None = None,
        context: ContextParallel | None = None,
    ) -> Tensor:
        """x: this rank's span with a context (conv and state continue the earlier spans; a
        cache, empty, ends with the span's exit state and conv inputs: a split prefill)."""
        B, T, _ = x.shape
        H, P, N, G = self.n_heads, self.head_dim, self.d_state, self.n_groups
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.d_inner + 2 * G * N, H], dim=-1)
        xs, b, c = self.conv(xbc, cache, context=context).split(
            [self.d_inner, G * N, G * N], dim=-1
        )
        dt = F.softplus(dt + self.dt_bias)  # [B, T, H]
        xs = xs.view(B, T, H, P).transpose(1, 2)  # [B, H, T, P]

        def per_head(t: Tensor) -> Tensor:  # [B, T, G*N] -> [B, H, T, N]
            return t.view(B, T, G, N).repeat_interleave(H // G, dim=2).transpose(1, 2)

        q, k = per_head(c), per_head(b)
        v = xs * dt.transpose(1, 2)[..., None]
        g = (-self.A_log.exp() * dt).transpose(1, 2)  # [B, H, T]
        state = None if cache is None else cache.get("S")
        y, state = gla(q, k, v, g, 1.0, state, self.chunk_size, context, self.kernels)
        if cache is not None:
            cache["S"] = state
        y = y + self.D[:, None, None] * xs
        y = self.norm(y.transpose(1, 2).reshape(B, T, self.d_inner), z)
        return self.out_proj(y)
