"""LaCT mixer: sliding-window attention plus a large-chunk TTT branch on the same q, k, v.

The window handles local order; the SwiGLU fast weights (per head, `hidden_ratio` x head_dim
hidden units) carry information across chunks, updated once per chunk of `chunk_size` tokens
with per-token learning rates η = softplus(lr_proj x + base). The branch reads q and k after
SiLU and L2 normalisation, without rotary positions; its output is RMS-normalised per head and
added to the attention output before o_proj.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltstudy.models.attention import Attention
from ltstudy.models.config import ModelConfig
from ltstudy.models.layers import RMSNorm
from ltstudy.ops.attention import repeat_kv
from ltstudy.ops.lact import lact, lact_step, row_norms, swiglu_apply


class LaCT(Attention):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        m = cfg.mixer
        self.chunk_size = m["chunk_size"]
        self.base_lr = math.log(math.expm1(m["base_lr"]))  # softplus(0 + base) = base_lr
        H, D = cfg.n_heads, cfg.head_dim
        hidden = m["hidden_ratio"] * D
        self.w1 = nn.Parameter(torch.empty(H, hidden, D))
        self.w2 = nn.Parameter(torch.empty(H, D, hidden))
        self.w3 = nn.Parameter(torch.empty(H, hidden, D))
        self.lr_proj = nn.Linear(cfg.d_model, 3 * H, bias=False)
        self.ttt_norm = RMSNorm(D, cfg.norm_eps)

    def fast_inputs(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, ...]:
        n_rep = self.n_heads // self.n_kv_heads
        q_t = F.normalize(F.silu(q), dim=-1)
        k_t = F.normalize(F.silu(repeat_kv(k, n_rep)), dim=-1)
        lr = F.softplus(self.lr_proj(x) + self.base_lr).view(*x.shape[:2], self.n_heads, 3)
        return q_t, k_t, repeat_kv(v, n_rep), lr.transpose(1, 2)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: dict | None = None) -> Tensor:
        q, k, v = self.project(x)
        y = self.attention(q, k, v, rope, cache)
        q_t, k_t, v_t, lr = self.fast_inputs(x, q, k, v)
        weights = (self.w1, self.w2, self.w3)
        if cache is None:
            fast, _ = lact(q_t, k_t, v_t, lr, weights, self.chunk_size)
        else:
            fast = self._fast_cached(q_t, k_t, v_t, lr, weights, cache)
        y = y + self.ttt_norm(fast)
        return self.o_proj(y.transpose(1, 2).flatten(2))

    def _fast_cached(
        self, q: Tensor, k: Tensor, v: Tensor, lr: Tensor, weights, cache: dict
    ) -> Tensor:
        """Stream tokens through the chunked branch: the chunk being filled is applied with the
        current fast weights and written once complete, as in the chunked form."""
        C = self.chunk_size
        outputs = []
        if "pending" in cache:
            take = min(C - cache["pending"][0].shape[2], q.shape[2])
            outputs.append(swiglu_apply(cache["W"], q[:, :, :take]))
            pk, pv, plr = (
                torch.cat([p, t[:, :, :take]], dim=2)
                for p, t in zip(cache.pop("pending"), (k, v, lr), strict=True)
            )
            q, k, v, lr = (t[:, :, take:] for t in (q, k, v, lr))
            if pk.shape[2] == C:
                cache["W"] = lact_step(cache["W"], row_norms(weights), pk, pv, plr)
            else:
                cache["pending"] = (pk, pv, plr)
        if q.shape[2]:
            out, cache["W"] = lact(q, k, v, lr, weights, C, cache.get("W"))
            outputs.append(out)
            tail = q.shape[2] % C
            if tail:
                cache["pending"] = tuple(t[:, :, t.shape[2] - tail :] for t in (k, v, lr))
        return torch.cat(outputs, dim=2)
