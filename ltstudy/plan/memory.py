"""Peak memory of one training rank (or one evaluation process) under a given layout.

    peak = runtime + training state + FSDP2's gathered buffers + activations + transients

training state   fp32 parameters, gradients and AdamW's two moments: 16 bytes per parameter,
                 divided over the ranks FSDP2 shards over (all of them; one node's with HSDP)
gathered         FSDP2 all-gathers parameters in the compute dtype for the root (embeddings,
                 head) and for two blocks at a time (one prefetched), and reduce-scatters one
                 block's gradients through a float32 buffer
activations      the census's per-block counts scaled to this rank's tokens: all of each
                 block's kept tensors, or, for a checkpointed block, only its input
transients       the largest of: a block's forward and backward peaks (with, when
                 checkpointed, its recomputed activations), and the loss head's
runtime          what the process holds beyond tensors: the CUDA context, NCCL and cuBLAS
                 workspaces on a GPU (not in torch.cuda.max_memory_allocated); the Python
                 interpreter with torch and the libraries on the CPU (in the resident set)
slack            on the CPU, glibc's malloc keeps freed blocks for reuse, so the resident set
                 peaks above the live tensors: measured 1.06-1.3x in training and up to 2x
                 (of small amounts) in a forward pass; the planner adds a quarter. On a GPU
                 the caching allocator's fragmentation is left to the capacity's headroom.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ltstudy.plan.counts import (
    CACHE,
    PieceMemory,
    block_kinds,
    block_memory,
    cache_key,
    loss_chunk,
    outer_memory,
)

GB = 1e9
CUDA_RUNTIME_BYTES = 1.5 * GB
CPU_RUNTIME_BYTES = 0.35 * GB  # measured: imports and the first step's lazy set-up, at 1K tokens
CPU_MALLOC_SLACK = 0.25
FLOAT32 = 4
STATE_BYTES = 16  # fp32 parameter + gradient + two AdamW moments


@dataclass(frozen=True)
class Shape:
    """Where the run executes and how its state is split."""

    device: str  # cuda | cpu
    dtype: str  # compute dtype: bf16 | fp32
    world: int  # ranks in the training job
    shard: int  # ranks FSDP2 shards the state over (1: no FSDP, the plain model)
    tokens: int  # tokens per forward on one rank: micro-batch x context / context degree
    micro: int  # sequences per forward


@dataclass(frozen=True)
class Estimate:
    runtime: float
    state: float
    gathered: float
    activations: float
    transient: float
    slack: float = 0.0

    @property
    def tensors(self) -> float:
        """The live tensors' peak (what torch.cuda.max_memory_allocated counts)."""
        return self.state + self.gathered + self.activations + self.transient

    @property
    def total(self) -> float:
        return self.runtime + self.tensors + self.slack


def _finish(device: str, state, gathered, activations, transient) -> Estimate:
    if device == "cuda":
        return Estimate(CUDA_RUNTIME_BYTES, state, gathered, activations, transient)
    tensors = state + gathered + activations + transient
    return Estimate(
        CPU_RUNTIME_BYTES, state, gathered, activations, transient, CPU_MALLOC_SLACK * tensors
    )


def _fit(measure, tokens: int, anchors: tuple[int, int]) -> PieceMemory:
    """A piece's memory at `tokens`: measured directly when short, else the line through two
    measurements beyond every chunk and window (memory is linear in tokens there)."""
    low, high = anchors
    if tokens <= high:  # short: measured as it is
        return measure(tokens)
    a, b = measure(low), measure(high)
    scale = (tokens - low) / (high - low)
    return PieceMemory(
        *(
            round(x + (y - x) * scale)
            for x, y in zip(vars(a).values(), vars(b).values(), strict=True)
        )
    )


def anchors(lengths: list[int | None], tokens: int) -> tuple[int, int]:
    """Two token counts (powers of two) beyond each of `lengths` (windows, chunks) shorter
    than `tokens`: between them memory grows as it does up to `tokens`."""
    below = [n for n in lengths if n and n < tokens]
    low = 1 << (2 * max([32, *below]) - 1).bit_length()
    return low, 2 * low


def block_lengths(model: Mapping[str, Any]) -> list[int | None]:
    """The windows and chunk sizes the blocks work in."""
    lengths = [model.get("swa_window")]
    lengths += [v for k, v in (model.get("mixer") or {}).items() if k == "chunk_size"]
    if model.get("ttt"):
        lengths.append(model["ttt"]["chunk_size"])
    return lengths


def outer_lengths(model: Mapping[str, Any]) -> list[int | None]:
    """The loss head works in chunks of tokens."""
    return [loss_chunk(model["vocab_size"])]


def parameter_counts(model: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters in total, of each block, and outside the blocks (meta device)."""
    return _parameter_counts(json.dumps(model, sort_keys=True))


@functools.cache
def _parameter_counts(model_json: str) -> dict[str, Any]:
    def count() -> dict[str, Any]:
        from ltstudy.plan.census import _model

        built = _model(model_json, "fp32")
        blocks = [sum(p.numel() for p in layer.parameters()) for layer in built.layers]
        total = sum(p.numel() for p in built.parameters())
        return {"total": total, "blocks": blocks, "outer": total - sum(blocks)}

    return CACHE.get(cache_key("parameters", model_json), count)


def _pieces(
    model: Mapping[str, Any], device: str, dtype: str, tokens: int
) -> tuple[list[tuple[list[int], PieceMemory]], PieceMemory]:
    """(layers of each kind with that kind's memory, the loss head's) for one sequence of
    `tokens` tokens."""
    key = json.dumps(model, sort_keys=True)
    points = anchors(block_lengths(model), tokens)
    blocks = [
        (
            layers,
            _fit(lambda t, i=layers[0]: block_memory(key, device, dtype, i, t), tokens, points),
        )
        for layers in block_kinds(model).values()
    ]
    outer_points = anchors(outer_lengths(model), tokens)
    outer = _fit(lambda t: outer_memory(key, device, dtype, t), tokens, outer_points)
    return blocks, outer


def training_memory(model: Mapping[str, Any], shape: Shape, checkpointing: str) -> Estimate:
    """Peak bytes of one rank in a training step (forward, backward, optimizer)."""
    counts = parameter_counts(model)
    act_bytes = 2 if shape.dtype == "bf16" else FLOAT32
    state = STATE_BYTES * counts["total"] / shape.shard
    gathered = 0.0
    if shape.shard > 1 or shape.device == "cuda":  # FSDP2 whenever there is a process group
        biggest = max(counts["blocks"])
        gathered = act_bytes * (counts["outer"] + 2 * biggest) + FLOAT32 * biggest
    blocks, outer = _pieces(model, shape.device, shape.dtype, shape.tokens // shape.micro)
    input_bytes = act_bytes * model["d_model"] * shape.tokens
    activations = shape.micro * outer.kept
    transient = shape.micro * max(outer.forward_peak, outer.backward_peak)
    for layers, piece in blocks:
        kept = shape.micro * piece.kept
        peak = shape.micro * max(piece.forward_peak, piece.backward_peak)
        for index in layers:
            if checkpointing == "full" or (checkpointing == "selective" and index % 2 == 0):
                activations += input_bytes  # and its activations again while recomputed
                transient = max(transient, kept + peak)
            else:
                activations += kept
                transient = max(transient, peak)
    return _finish(shape.device, state, gathered, activations, transient)


def prefill_memory(model: Mapping[str, Any], device: str, dtype: str, tokens: int) -> Estimate:
    """Peak bytes of a forward pass without gradients over `tokens` tokens on one device (the
    plain model, as evaluation runs it): the weights, the residual stream, the embeddings, and
    the most that one block or the loss head holds at once."""
    act_bytes = 2 if dtype == "bf16" else FLOAT32
    weights = act_bytes * parameter_counts(model)["total"]  # bf16 only on a GPU
    stream = 2 * act_bytes * model["d_model"] * tokens  # residual stream and embeddings
    blocks, outer = _pieces(model, device, dtype, tokens)
    peak = max([outer.inference, *(piece.inference for _, piece in blocks)])
    return _finish(device, weights, 0.0, stream, peak)
