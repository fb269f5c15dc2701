"""In-Place TTT MLP: a SwiGLU whose down projection is also a fast weight.

The fast weight is written with V̂ = Conv1D(X) W_target, where X is the token embeddings (or the
MLP's own input), the conv is depthwise over time and zero-initialised, and W_target starts
diagonal. A zero conv gives V̂ = 0, so the layer starts exactly as its backbone MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltstudy.models.config import TTTConfig
from ltstudy.models.layers import SwiGLU
from ltstudy.ops.ttt import inplace_ttt


class TargetConv(nn.Module):
    """Depthwise conv over time with chunk-local two-sided or sequence-causal padding."""

    def __init__(self, dim: int, kernel: int, padding: str, chunk_size: int):
        super().__init__()
        self.kernel, self.padding, self.chunk_size = kernel, padding, chunk_size
        self.weight = nn.Parameter(torch.zeros(dim, 1, kernel))

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        if self.padding == "causal":
            h = F.pad(x.transpose(1, 2), (self.kernel - 1, 0))
            return F.conv1d(h, self.weight.to(x.dtype), groups=D).transpose(1, 2)
        C = self.chunk_size
        pad = -T % C
        h = F.pad(x, (0, 0, 0, pad)).view(-1, C, D).transpose(1, 2)  # [B*N, D, C]
        left = (self.kernel - 1) // 2
        h = F.pad(h, (left, self.kernel - 1 - left))
        h = F.conv1d(h, self.weight.to(x.dtype), groups=D)
        return h.transpose(1, 2).reshape(B, T + pad, D)[:, :T]


class InPlaceTTTMLP(SwiGLU):
    def __init__(self, d_model: int, d_ff: int, ttt: TTTConfig):
        super().__init__(d_model, d_ff)
        self.ttt = ttt
        self.ttt_conv = (
            TargetConv(d_model, ttt.conv_kernel, ttt.conv_padding, ttt.chunk_size)
            if ttt.conv_kernel > 0
            else None
        )
        self.ttt_proj = nn.Linear(d_model, d_model, bias=False) if ttt.w_target else None

    def target(self, source: Tensor) -> Tensor:
        v = source if self.ttt_conv is None else self.ttt_conv(source)
        return v if self.ttt_proj is None else self.ttt_proj(v)

    def forward(self, x: Tensor, embeddings: Tensor | None = None) -> Tensor:
        source = x if self.ttt.target == "mlp_input" else embeddings
        return inplace_ttt(
            self.activations(x),
            self.target(source),
            self.down_proj.weight,
            eta=self.ttt.eta,
            chunk_size=self.ttt.chunk_size,
            clip_tau=self.ttt.clip_tau,
            clip_order=self.ttt.clip_order,
        )
