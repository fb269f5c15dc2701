"""Rotary position embeddings and their context-extension methods.

Each method returns the inverse frequencies (one per pair of dimensions) and an attention factor
that multiplies cos and sin, following Hugging Face's `modeling_rope_utils` so that checkpoints
behave as they do there. `scaling` is None or a dict with `type` and the method's fields:

  linear   factor                                 positions / factor (position interpolation)
  ntk      factor                                 base * factor^(d/(d-2)) (static NTK-aware)
  dynamic  factor, original_context               NTK base grown with the current length
  yarn     factor, original_context, beta_fast=32, beta_slow=1, attention_factor=None
  llama3   factor, original_context, low_freq_factor=1, high_freq_factor=4
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

METHODS = ("linear", "ntk", "dynamic", "yarn", "llama3")


def default_inv_freq(head_dim: int, base: float) -> Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (base**exponent)


def yarn_mscale(factor: float) -> float:
    """YaRN's attention factor sqrt(1/t) = 0.1 ln(s) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def _yarn(head_dim: int, base: float, s: Mapping[str, Any]) -> tuple[Tensor, float]:
    factor, original = s["factor"], s["original_context"]

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(s.get("beta_fast", 32))), 0)
    high = min(math.ceil(correction_dim(s.get("beta_slow", 1))), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp(
        (torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1
    )
    extrapolate = 1 - ramp  # 1 for high-frequency dimensions, kept as they are
    pos_freqs = base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    attention = s.get("attention_factor")
    return inv_freq, yarn_mscale(factor) if attention is None else attention


def _llama3(head_dim: int, base: float, s: Mapping[str, Any]) -> tuple[Tensor, float]:
    inv_freq = default_inv_freq(head_dim, base)
    factor, original = s["factor"], s["original_context"]
    low_ff, high_ff = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    low_wavelen, high_wavelen = original / low_ff, original / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def rope_frequencies(
    head_dim: int, base: float, scaling: Mapping[str, Any] | None, seq_len: int | None = None
) -> tuple[Tensor, float]:
    """(inverse frequencies [head_dim // 2], attention factor) of a method at a length."""
    kind = scaling["type"] if scaling else None
    if kind is None:
        return default_inv_freq(head_dim, base), 1.0
    if kind == "linear":
        return default_inv_freq(head_dim, base) / scaling["factor"], 1.0
    if kind == "ntk":
        return default_inv_freq(
            head_dim, base * scaling["factor"] ** (head_dim / (head_dim - 2))
        ), 1.0
    if kind == "dynamic":
        original = scaling["original_context"]
        if seq_len is None or seq_len <= original:
            return default_inv_freq(head_dim, base), 1.0
        grown = base * ((scaling["factor"] * seq_len / original) - (scaling["factor"] - 1)) ** (
            head_dim / (head_dim - 2)
        )
        return default_inv_freq(head_dim, grown), 1.0
    if kind == "yarn":
        return _yarn(head_dim, base, scaling)
    if kind == "llama3":
        return _llama3(head_dim, base, scaling)
    raise ValueError(f"unknown rope scaling {kind!r} (known: {', '.join(METHODS)})")


class Rotary(nn.Module):
    """cos/sin tables (Hugging Face 'rotate_half' layout), attention factor folded in."""

    def __init__(self, head_dim: int, base: float, scaling: Mapping[str, Any] | None = None):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.scaling = dict(scaling) if scaling else None

    def forward(self, start: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Tables for positions start .. start + length - 1."""
        inv_freq, factor = rope_frequencies(self.head_dim, self.base, self.scaling, start + length)
        t = torch.arange(start, start + length, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.to(device))
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * factor, emb.sin() * factor


def scalings_for_length(
    run_scaling: Mapping[str, Any] | None,
    beyond: Mapping[str, Any] | None,
    context: int,
    length: int,
    rotary: bool = True,
) -> list[dict | None]:
    """Position methods to evaluate `length` with: always the run's own; beyond the training
    context, if the model uses RoPE, also the configured extension (factor null = length /
    context), for comparison."""
    own = dict(run_scaling) if run_scaling else None
    if beyond is None or length <= context or not rotary:
        return [own]
    scaling = {k: v for k, v in beyond.items() if v is not None}
    scaling.setdefault("factor", length / context)
    scaling.setdefault("original_context", context)
    return [own, scaling]


def scaling_label(scaling: Mapping[str, Any] | None) -> str:
    return "none" if not scaling else f"{scaling['type']} x{scaling['factor']:g}"
