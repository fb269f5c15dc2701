"""GLA: gated linear attention (Yang et al., 2024) with a per-key, data-dependent decay.

Keys and decays come from the input; the decay is logsigmoid(low-rank projection) / normalizer
so that it stays mild (and is floored where the chunkwise form could not fold it exactly).
The output is RMS-normalised per head and gated by SiLU(g).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from ltstudy.models.config import ModelConfig
from ltstudy.models.layers import GatedRMSNorm
from ltstudy.ops.gla import gla, min_log_decay

if TYPE_CHECKING:
    from ltstudy.parallel.context import ContextParallel


class GatedLinearAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        m = cfg.mixer
        self.n_heads, self.key_dim, self.value_dim = m["n_heads"], m["key_dim"], m["value_dim"]
        self.chunk_size, self.normalizer = m["chunk_size"], m["gate_normalizer"]
        self.kernels = cfg.kernels
        d, hk, hv = cfg.d_model, self.n_heads * self.key_dim, self.n_heads * self.value_dim
        self.q_proj = nn.Linear(d, hk, bias=False)
        self.k_proj = nn.Linear(d, hk, bias=False)
        self.v_proj = nn.Linear(d, hv, bias=False)
        self.g_proj = nn.Linear(d, hv, bias=False)
        self.gk_down = nn.Linear(d, m["gate_rank"], bias=False)
        self.gk_up = nn.Linear(m["gate_rank"], hk, bias=True)
        self.o_norm = GatedRMSNorm(self.value_dim, cfg.norm_eps, norm_before_gate=True)
        self.o_proj = nn.Linear(hv, d, bias=False)

    def forward(
        self,
        x: Tensor,
        rope: object = None,
        cache: dict | None = None,
        context: ContextParallel | None = None,
    ) -> Tensor:
        """x: this rank's span with a context (the state enters from the earlier spans; a
        cache, empty, ends with the span's exit state: a split prefill)."""
        B, T, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, self.n_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        gk = F.logsigmoid(self.gk_up(self.gk_down(x))) / self.normalizer
        gk = heads(gk.clamp_min(min_log_decay(self.chunk_size)))  # the chunk form's range
        state = None if cache is None else cache.get("S")
        scale = self.key_dim**-0.5
        o, state = gla(q, k, v, gk, scale, state, self.chunk_size, context, self.kernels)
        if cache is not None:
            cache["S"] = state
        o = o.transpose(1, 2)  # [B, T, H, V]
        o = self.o_norm(o, self.g_proj(x).view(B, T, self.n_heads, self.value_dim))
        return self.o_proj(o.flatten(2))
