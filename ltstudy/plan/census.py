"""Activation memory of a model's pieces, counted on the meta device.

A dispatch mode follows every tensor storage that the pieces allocate and frees it when the
storage dies, so running a block's forward and backward on meta tensors (no memory, no
arithmetic) gives the bytes it keeps for the backward pass and the peak of what it holds
meanwhile, exactly as the eager code allocates them. Attention is the op that differs most by
device: on meta, PyTorch would take the math path and build the [T, T] score matrix, while the
flash / memory-efficient kernels keep only the output and its log-sum-exp (on the CPU only
without a mask: with one it takes the math path too); the census stands in an op that
allocates what the kernels of the target device do. RMSNorm likewise: CUDA runs one fused
kernel where meta (and the CPU) decompose it into full-width steps.

The same run, without gradients and with a decode cache, counts what a block's cache holds
after a prefill (its keys and values, states and conv tails).

Each count is per piece and per token count; the planner fits a line through two token counts
beyond every chunk and window, where memory grows linearly, and scales it to the run's tokens.
The planner reads the counts through counts.py, which imports this module (and torch) only
for counts that its disk cache lacks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# kept in counts.py (torch-free); here for the callers that count
from ltstudy.plan.counts import (  # noqa: F401
    CacheMemory,
    PieceMemory,
    block_memory,
    cache_memory,
    outer_memory,
)


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak, among storages created inside."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            # views and in-place results share a storage that exists already (a parameter's,
            # say, allocated before the count began): only new storages are allocations
            if isinstance(t, torch.Tensor) and not t._is_view():
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._sizes and key not in inputs:
                    self._sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.live)
        return out


class _Attention(torch.autograd.Function):
    """What SDPA's kernels allocate: flash and memory-efficient attention (CUDA; the CPU
    without a mask) keep the output and a float32 log-sum-exp per query with q, k, v; the CPU's
    math path, taken with a mask, also materialises and keeps the [Tq, Tk] weights."""

    @staticmethod
    def forward(ctx, q, k, v, weights):
        out = torch.empty_like(q)
        kept = [q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32)]
        if weights:
            kept.append(q.new_empty(*q.shape[:-1], k.shape[-2]))
        ctx.save_for_backward(*kept)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


class _FusedRMSNorm(torch.autograd.Function):
    """What CUDA's fused RMSNorm kernel allocates: the output, and for the backward the input
    and one float32 reciprocal RMS per row (the decomposition on meta keeps several
    full-width intermediates instead)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight, x.new_empty(x.shape[:-1], dtype=torch.float32))
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        x, weight, _ = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(weight)


@contextlib.contextmanager
def device_kernels(device: str) -> Iterator[None]:
    """Route the ops whose fused kernels allocate differently from their decomposition on
    meta to stand-ins that allocate what the kernels on `device` do: scaled-dot-product
    attention everywhere, RMSNorm on CUDA."""
    sdpa, rms_norm = F.scaled_dot_product_attention, F.rms_norm

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        return _Attention.apply(q, k, v, device == "cpu" and attn_mask is not None)

    def fused_rms_norm(x, normalized_shape, weight=None, eps=None):
        return _FusedRMSNorm.apply(x, weight)

    F.scaled_dot_product_attention = attention
    if device == "cuda":
        F.rms_norm = fused_rms_norm
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.rms_norm = sdpa, rms_norm


def _measure(
    module: torch.nn.Module,
    device: str,
    run: Callable[[], torch.Tensor],
    grad_like: Callable[[torch.Tensor], None],
) -> PieceMemory:
    with device_kernels(device), LiveBytes() as tracker:
        with torch.no_grad():
            before = tracker.live
            out = run()
            inference = tracker.peak - before
            del out
        tracker.reset_peak()
        before = tracker.live
        out = run()
        kept = tracker.live - before
        forward_peak = tracker.peak - tracker.live
        tracker.reset_peak()
        start = tracker.live
        grad_like(out)
        backward_peak = tracker.peak - start
    module.zero_grad(set_to_none=True)  # the next count allocates its gradients anew
    return PieceMemory(kept, forward_peak, backward_peak, inference)


@functools.cache
def _model(model_json: str, dtype: str):
    from ltstudy.models.transformer import build_model

    model = build_model(json.loads(model_json), seed=None, device="meta")
    return model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)


def block_kinds(model_cfg: Mapping[str, Any]) -> dict[tuple, list[int]]:
    """Layers grouped by what they allocate: their attention window and whether their MLP
    carries In-Place TTT (every other setting is the same in all layers)."""
    from ltstudy.models.attention import layer_window
    from ltstudy.models.config import ModelConfig

    cfg = ModelConfig.from_dict(dict(model_cfg))
    kinds: dict[tuple, list[int]] = {}
    for index in range(cfg.n_layers):
        kinds.setdefault((layer_window(cfg, index), cfg.has_ttt(index)), []).append(index)
    return kinds


def _block_memory(model_json: str, device: str, dtype: str, layer: int, tokens: int) -> PieceMemory:
    model = _model(model_json, dtype)
    block = model.layers[layer]
    act = torch.bfloat16 if dtype == "bf16" else torch.float32
    d = model.cfg.d_model
    x = torch.empty(1, tokens, d, device="meta", dtype=act, requires_grad=True)
    embeddings = torch.empty(1, tokens, d, device="meta", dtype=act)
    rope = model.rotary(0, tokens, torch.device("meta"))

    def run() -> torch.Tensor:
        return block(x, embeddings, rope)

    return _measure(block, device, run, lambda out: out.backward(torch.empty_like(out)))


def _cache_memory(model_json: str, dtype: str, layer: int, tokens: int) -> CacheMemory:
    model = _model(model_json, dtype)
    act = torch.bfloat16 if dtype == "bf16" else torch.float32
    x = torch.empty(1, tokens, model.cfg.d_model, device="meta", dtype=act)
    cache: dict = {}
    with torch.no_grad():
        model.layers[layer](x, x, model.rotary(0, tokens, torch.device("meta")), cache)
    keys_values, states, storages = 0, 0, {}
    for part in cache.values():  # the mixer's and the MLP's
        for name, value in part.items():
            for t in tree_leaves(value):
                if isinstance(t, torch.Tensor):
                    if name in ("k", "v"):
                        keys_values += t.numel() * t.element_size()
                    else:
                        states += t.numel() * t.element_size()
                    storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return CacheMemory(keys_values, states, sum(storages.values()))


def _outer_memory(model_json: str, device: str, dtype: str, tokens: int) -> PieceMemory:
    model = _model(model_json, dtype)
    ids = torch.zeros(1, tokens + 1, dtype=torch.long, device="meta")
    layers, model.layers = model.layers, torch.nn.ModuleList()
    try:

        def run() -> torch.Tensor:
            return model.token_losses(ids[:, :-1], ids[:, 1:])

        return _measure(model, device, run, lambda out: out.sum().backward())
    finally:
        model.layers = layers
