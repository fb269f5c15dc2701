"""Building blocks shared by the variants: norms, rotary application, SwiGLU, short conv."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from ltstudy.parallel.context import ContextParallel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 -> float32, float64 stays
        return F.rms_norm(x.to(dtype), (x.shape[-1],), self.weight.to(dtype), self.eps).type_as(x)


class GatedRMSNorm(RMSNorm):
    """RMSNorm with a SiLU gate, in either order (mamba_ssm's RMSNormGated, without bias).

    norm_before_gate=True: RMSNorm(x)·w·silu(gate), Gated DeltaNet's output norm.
    norm_before_gate=False: RMSNorm(x·silu(gate))·w, Mamba2's, where the gate also scales what
    is normalised. `group_size` normalises each group of that many channels on its own (Mamba2
    uses d_inner / n_groups); None = all channels.
    """

    def __init__(
        self, dim: int, eps: float, *, norm_before_gate: bool, group_size: int | None = None
    ):
        super().__init__(dim, eps)
        self.norm_before_gate = norm_before_gate
        self.group_size = group_size or dim
        if dim % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide {dim} channels")

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:  # type: ignore[override]
        dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 -> float32
        gate = F.silu(gate.to(dtype))
        h = x.to(dtype) if self.norm_before_gate else x.to(dtype) * gate
        weight = self.weight.to(dtype)
        if self.group_size == h.shape[-1]:
            h = F.rms_norm(h, (self.group_size,), weight, self.eps)
        else:
            groups = h.unflatten(-1, (-1, self.group_size))
            rms = groups.square().mean(-1, keepdim=True).add(self.eps).rsqrt()
            h = (groups * rms).flatten(-2) * weight
        return (h * gate if self.norm_before_gate else h).type_as(x)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def activations(self, x: Tensor) -> Tensor:
        return F.silu(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.activations(x))


class ShortConv(nn.Module):
    """Causal depthwise conv over time (+ SiLU) with a cache of the last kernel-1 inputs."""

    def __init__(self, channels: int, kernel: int = 4):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(
        self,
        x: Tensor,
        cache: dict | None = None,
        key: str = "conv",
        context: ContextParallel | None = None,
    ) -> Tensor:
        """x: [B, T, channels]. With a cache, continues from (and updates) cache[key]; with a
        context, from the previous span's last kernel-1 inputs (the first span from zeros);
        with both (a split prefill, the cache empty), cache[key] ends as the last kernel-1
        inputs of halo and span, on the last rank the sequence's."""
        zeros = self.kernel - 1
        if context is not None:
            x = context.with_halo(x, self.kernel - 1, dim=1)
            zeros = self.kernel - 1 if context.first else 0
        h = x.transpose(1, 2)
        if cache is not None and key in cache:
            history = cache[key]
        else:
            history = h.new_zeros(h.shape[0], h.shape[1], zeros)
        h = torch.cat([history, h], dim=2)
        if cache is not None:
            cache[key] = h[:, :, h.shape[2] - (self.kernel - 1) :]
        y = F.conv1d(h, self.weight.to(h.dtype), self.bias.to(h.dtype), groups=h.shape[1])
        return F.silu(y).transpose(1, 2)
