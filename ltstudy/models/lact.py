"""LaCT mixer: sliding-window attention plus a large-chunk TTT branch on the same q, k, v.

The window handles local order; the SwiGLU fast weights (per head, `hidden_ratio` x head_dim
hidden units) carry information across chunks, updated once per chunk of `chunk_size` tokens
with per-token learning rates η = softplus(lr_proj x + softplus⁻¹(base_lr)). The branch
follows the official LM layer (a1600012888/LaCT, `LaCTSWIGLULayer`), each step an option whose
default is the official one: fast q and k get a learnable per-channel scale and offset
(`qk_scale_offset`), then SiLU (v too, `v_silu`), L2 norm per head and the attention's RoPE
(`fast_rope`); the update may carry momentum (`use_momentum`) and be orthogonalised by
Newton-Schulz (`use_muon`). The branch's output is RMS-normalised per head, scaled by
silu(ttt_scale_proj x) per head (`learnable_ttt_scale`), and added to the attention output
before o_proj. The branch's gate math takes fused Triton kernels where `model.kernels` (kept
as `self.kernels` by Attention) chooses the fast path.

Context parallelism: the update is not affine in the fast weights, so they (and the momentum
buffer) pass from rank to rank in order (`ContextParallel.relay`): rank r runs its chunks from
the state rank r - 1 ended with. The window attention's halo exchange is built on the relay's
output, so in the backward pass it runs before the relay's (see `relay`). A split prefill (a
context and an empty cache) keeps the span's final fast weights and its partial last chunk,
as decoding does; the last rank's are the sequence's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltstudy.models.attention import Attention
from ltstudy.models.config import ModelConfig
from ltstudy.models.layers import RMSNorm, apply_rotary
from ltstudy.ops.attention import repeat_kv
from ltstudy.ops.lact import LaCTState, initial_state, lact, lact_step, row_norms, swiglu_apply
from ltstudy.parallel.context import ContextParallel, after


class FastQKNorm(nn.Module):
    """How LaCT prepares a fast query or key: per-channel scale and offset (learned, from 1 and
    0; fixed when `affine` is off), SiLU, then L2 norm per head (x / (|x| + 1e-5), official)."""

    def __init__(self, n_heads: int, head_dim: int, affine: bool):
        super().__init__()
        self.affine = affine
        if affine:  # flat, so weight decay leaves them alone as it does norms and biases
            self.weight = nn.Parameter(torch.ones(n_heads * head_dim))
            self.bias = nn.Parameter(torch.zeros(n_heads * head_dim))

    def forward(self, x: Tensor) -> Tensor:  # [B, H, T, D]
        if self.affine:
            shape = (x.shape[1], 1, x.shape[3])
            x = x * self.weight.view(shape) + self.bias.view(shape)
        x = F.silu(x)
        return x / (x.norm(dim=-1, keepdim=True) + 1e-5)


class LaCT(Attention):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        m = cfg.mixer
        self.chunk_size = m["chunk_size"]
        self.base_lr = math.log(math.expm1(m["base_lr"]))  # softplus(0 + base) = base_lr
        self.use_muon, self.v_silu, self.fast_rope = m["use_muon"], m["v_silu"], m["fast_rope"]
        H, D = cfg.n_heads, cfg.head_dim
        hidden = m["hidden_ratio"] * D
        self.w1 = nn.Parameter(torch.empty(H, hidden, D))
        self.w2 = nn.Parameter(torch.empty(H, D, hidden))
        self.w3 = nn.Parameter(torch.empty(H, hidden, D))
        self.lr_proj = nn.Linear(cfg.d_model, 3 * H)
        self.fast_q_norm = FastQKNorm(H, D, m["qk_scale_offset"])
        self.fast_k_norm = FastQKNorm(H, D, m["qk_scale_offset"])
        self.momentum_proj = nn.Linear(cfg.d_model, H) if m["use_momentum"] else None
        self.ttt_scale_proj = nn.Linear(cfg.d_model, H) if m["learnable_ttt_scale"] else None
        self.ttt_norm = RMSNorm(D, cfg.norm_eps)

    def fast_inputs(
        self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, ...]:
        """Fast q, k, v [B, H, T, D], learning rates [B, H, T, 3], momentum [B, H, T] or None."""
        n_rep = self.n_heads // self.n_kv_heads
        q_t, k_t = self.fast_q_norm(q), self.fast_k_norm(repeat_kv(k, n_rep))
        if self.fast_rope:
            q_t, k_t = apply_rotary(q_t, *rope), apply_rotary(k_t, *rope)
        v_t = repeat_kv(F.silu(v) if self.v_silu else v, n_rep)
        lr = F.softplus(self.lr_proj(x) + self.base_lr).view(*x.shape[:2], self.n_heads, 3)
        momentum = None
        if self.momentum_proj is not None:
            momentum = torch.sigmoid(self.momentum_proj(x)).transpose(1, 2)
        return q_t, k_t, v_t, lr.transpose(1, 2), momentum

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: dict | None = None,
        context: ContextParallel | None = None,
    ) -> Tensor:
        q, k, v = self.project(x)
        q_t, *per_token = self.fast_inputs(x, q, k, v, rope)
        if context is not None:
            fast = self._fast_relayed(q_t, per_token, context, cache)
            q, k, v = (after(t, fast) for t in (q, k, v))  # the halo's backward runs first
            y = self.attention(q, k, v, rope, cache, context)
        elif cache is None:
            y = self.attention(q, k, v, rope, None)
            fast = self._fast(q_t, *per_token)[0]
        else:
            y = self.attention(q, k, v, rope, cache)
            fast = self._fast_cached(q_t, per_token, cache)
        fast = self.ttt_norm(fast)
        if self.ttt_scale_proj is not None:
            fast = fast * F.silu(self.ttt_scale_proj(x)).transpose(1, 2)[..., None]
        y = y + fast
        return self.o_proj(y.transpose(1, 2).flatten(2))

    def _fast(self, q, k, v, lr, momentum, state=None):
        weights = (self.w1, self.w2, self.w3)
        return lact(
            q, k, v, lr, weights, self.chunk_size, state, momentum, self.use_muon, self.kernels
        )

    def _fast_relayed(
        self, q: Tensor, per_token: list, context: ContextParallel, cache: dict | None
    ) -> Tensor:
        """This rank's chunks, from the fast weights (and momentum) the previous rank ended
        with; the first rank starts from the learned weights. A cache (a split prefill) ends
        as `_fast_cached` leaves it: the state after the span's last complete chunk and the
        unwritten tail of a partial one."""
        momentum = per_token[-1] is not None
        start = initial_state((self.w1, self.w2, self.w3), q.shape[0], momentum)
        flat = (*start.weights, *(start.velocity or ()))

        def run(state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
            velocity = state[3:] if momentum else None
            out, final = self._fast(q, *per_token, state=LaCTState(state[:3], velocity))
            return out, (*final.weights, *(final.velocity or ()))

        out, final = context.relay(flat, run)
        if cache is not None:
            cache["W"] = LaCTState(final[:3], final[3:] if momentum else None)
            tail = q.shape[2] % self.chunk_size
            if tail:
                cache["pending"] = [
                    None if t is None else t[:, :, t.shape[2] - tail :] for t in per_token
                ]
        return out

    def _fast_cached(self, q: Tensor, per_token: list, cache: dict) -> Tensor:
        """Stream tokens through the chunked branch: the chunk being filled is applied with the
        current fast weights and written once complete, as in the chunked form. `per_token` is
        (k, v, lr, momentum); the unwritten tail of the chunk waits in the cache."""
        C = self.chunk_size
        outputs = []
        if "pending" in cache:
            take = min(C - cache["pending"][0].shape[2], q.shape[2])
            outputs.append(swiglu_apply(cache["W"].weights, q[:, :, :take], self.kernels))
            pending = [
                None if p is None else torch.cat([p, t[:, :, :take]], dim=2)
                for p, t in zip(cache.pop("pending"), per_token, strict=True)
            ]
            q = q[:, :, take:]
            per_token = [None if t is None else t[:, :, take:] for t in per_token]
            if pending[0].shape[2] == C:
                norms = row_norms((self.w1, self.w2, self.w3))
                cache["W"] = lact_step(
                    cache["W"], norms, *pending, use_muon=self.use_muon, kernels=self.kernels
                )
            else:
                cache["pending"] = pending
        if q.shape[2]:
            out, cache["W"] = self._fast(q, *per_token, state=cache.get("W"))
            outputs.append(out)
            tail = q.shape[2] % C
            if tail:
                cache["pending"] = [
                    None if t is None else t[:, :, t.shape[2] - tail :] for t in per_token
                ]
        return torch.cat(outputs, dim=2)
