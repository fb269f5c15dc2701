"""Gated DeltaNet (Yang et al., ICLR 2025): the delta rule with a Mamba2-style scalar decay.

q, k, v pass a short causal conv; q and k are L2-normalised per head; β = sigmoid(b_proj x);
decay g = -exp(A_log) · softplus(a_proj x + dt_bias). Output: RMSNorm(o)·w·silu(g_proj x) per
head (norm, then gate, as FLA's FusedRMSNormGated), then projection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltstudy.models.config import ModelConfig
from ltstudy.models.layers import GatedRMSNorm, ShortConv
from ltstudy.ops.delta_rule import gated_delta_rule

if TYPE_CHECKING:
    from ltstudy.parallel.context import ContextParallel


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        m = cfg.mixer
        self.n_heads, self.head_dim, self.chunk_size = m["n_heads"], m["head_dim"], m["chunk_size"]
        self.kernels = cfg.kernels
        d, inner = cfg.d_model, self.n_heads * self.head_dim
        self.q_proj = nn.Linear(d, inner, bias=False)
        self.k_proj = nn.Linear(d, inner, bias=False)
        self.v_proj = nn.Linear(d, inner, bias=False)
        self.g_proj = nn.Linear(d, inner, bias=False)
        self.a_proj = nn.Linear(d, self.n_heads, bias=False)
        self.b_proj = nn.Linear(d, self.n_heads, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.n_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.n_heads))
        self.q_conv = ShortConv(inner, m["conv_size"])
        self.k_conv = ShortConv(inner, m["conv_size"])
        self.v_conv = ShortConv(inner, m["conv_size"])
        self.o_norm = GatedRMSNorm(self.head_dim, cfg.norm_eps, norm_before_gate=True)
        self.o_proj = nn.Linear(inner, d, bias=False)

    def forward(
        self,
        x: Tensor,
        rope: object = None,
        cache: dict | None = None,
        context: ContextParallel | None = None,
    ) -> Tensor:
        """x: this rank's span with a context (convs and state continue the earlier spans; a
        cache, empty, ends with the span's exit state and conv inputs: a split prefill)."""
        B, T, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        q = F.normalize(heads(self.q_conv(self.q_proj(x), cache, "q_conv", context)), dim=-1)
        k = F.normalize(heads(self.k_conv(self.k_proj(x), cache, "k_conv", context)), dim=-1)
        v = heads(self.v_conv(self.v_proj(x), cache, "v_conv", context))
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)  # [B, H, T]
        g = (-self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)).transpose(1, 2)
        state = None if cache is None else cache.get("S")
        scale = self.head_dim**-0.5
        o, state = gated_delta_rule(
            q, k, v, g, beta, scale, state, self.chunk_size, context, self.kernels
        )
        if cache is not None:
            cache["S"] = state
        o = self.o_norm(o.transpose(1, 2), self.g_proj(x).view(B, T, self.n_heads, self.head_dim))
        return self.o_proj(o.flatten(2))
