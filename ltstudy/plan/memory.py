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

Context parallelism (degree K) gives each rank a span of every sequence (`longest_span`), so
the census's counts are taken at the span's length, and adds to each block what it exchanges
(`context_exchange`): full attention all-gathers the keys and values of the whole sequence
(the Llama 3 recipe), a sliding window receives the window's halo, and recurrent mixers and
In-Place TTT all-gather one state summary per rank, whatever the sequence length.

Evaluation (`prefill_memory`) holds the weights unsharded, the residual stream of one span,
the decode cache of its span (passkey, RULER) and the largest block's or the loss head's
forward without gradients: logits exist only for a loss chunk or for the decoded position.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ltstudy.parallel.spans import span_multiple, span_problem, split_spans
from ltstudy.plan.counts import (
    CACHE,
    PieceMemory,
    block_kinds,
    block_memory,
    cache_key,
    cache_memory,
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
    tokens: int  # tokens per forward on one rank: micro-batch x the longest span
    micro: int  # sequences per forward
    degree: int = 1  # context-parallel ranks that share each sequence
    sequence: int = 0  # tokens of a whole sequence (read when degree > 1)


@dataclass(frozen=True)
class Estimate:
    runtime: float
    state: float
    gathered: float
    activations: float
    transient: float
    slack: float = 0.0
    cache: float = 0.0  # evaluation: the decode cache

    @property
    def tensors(self) -> float:
        """The live tensors' peak (what torch.cuda.max_memory_allocated counts)."""
        return self.state + self.gathered + self.activations + self.transient + self.cache

    @property
    def total(self) -> float:
        return self.runtime + self.tensors + self.slack


def _finish(device: str, state, gathered, activations, transient, cache=0.0) -> Estimate:
    if device == "cuda":
        return Estimate(CUDA_RUNTIME_BYTES, state, gathered, activations, transient, 0.0, cache)
    tensors = state + gathered + activations + transient + cache
    slack = CPU_MALLOC_SLACK * tensors
    return Estimate(CPU_RUNTIME_BYTES, state, gathered, activations, transient, slack, cache)


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


def longest_span(length: int, degree: int, model: Mapping[str, Any]) -> int:
    """Tokens of the longest span when a `length`-token sequence is split over `degree` ranks
    (`ltstudy.parallel.spans`); ValueError if it cannot be, or if a span is shorter than the
    window or conv halo it hands on."""
    problem = span_problem(model, length, degree)
    if problem:
        raise ValueError(problem)
    return split_spans(length, degree, span_multiple(model))[0]


def cache_bytes(model: Mapping[str, Any], dtype: str, layer: int, tokens: int) -> float:
    """What one layer's decode cache keeps alive after a prefill of `tokens` tokens: counted,
    or beyond two counts past every chunk and window, on the line through them."""
    key = json.dumps(model, sort_keys=True)
    low, high = anchors(block_lengths(model), math.inf)
    if tokens <= high:
        return cache_memory(key, dtype, layer, tokens).retained
    a, b = cache_memory(key, dtype, layer, low), cache_memory(key, dtype, layer, high)
    return a.retained + (b.retained - a.retained) * (tokens - low) / (high - low)


def context_exchange(
    model: Mapping[str, Any], dtype: str, layer: int, window: int | None, degree: int, sequence: int
) -> PieceMemory:
    """What context parallelism over `degree` ranks adds to one block, for one sequence of
    `sequence` tokens (T):

    gathered   full attention: 2 x T x kv heads x head_dim x bytes, the keys and values of
               the whole sequence, kept for the backward pass; beside them the all-gather's
               padded buffer in the forward pass, their gradients in the backward pass
    halo       sliding window: (window - 1) x (2 kv heads + 2 heads) x head_dim x bytes, the
               received keys and values, the queries padded over them and their output
    summaries  what the layer's decode cache holds besides keys and values (recurrent states,
               In-Place TTT's and LaCT's fast weights, conv tails: independent of T) is its
               state; each rank all-gathers a transition and a bias of at most that size from
               every rank: 2 x degree x state, kept (LaCT hands one state on: less)
    """
    if degree == 1:
        return PieceMemory(0, 0, 0, 0)
    act_bytes = 2 if dtype == "bf16" else FLOAT32
    low = anchors(block_lengths(model), math.inf)[0]
    cache = cache_memory(json.dumps(model, sort_keys=True), dtype, layer, low)
    width = 2 * model["n_kv_heads"] * model["head_dim"] * act_bytes  # a token's key and value
    gathered = width * sequence if window is None and cache.keys_values else 0
    halo = 0
    if window:
        halo = (window - 1) * (width + 2 * model["n_heads"] * model["head_dim"] * act_bytes)
    kept = gathered + halo + 2 * degree * cache.states
    return PieceMemory(
        kept=kept, forward_peak=gathered, backward_peak=kept + gathered, inference=kept + gathered
    )


def _add(a: PieceMemory, b: PieceMemory) -> PieceMemory:
    return PieceMemory(*(x + y for x, y in zip(vars(a).values(), vars(b).values(), strict=True)))


def _pieces(
    model: Mapping[str, Any], device: str, dtype: str, tokens: int, degree: int, sequence: int
) -> tuple[list[tuple[list[int], PieceMemory]], PieceMemory]:
    """(layers of each kind with that kind's memory, the loss head's) for one span of `tokens`
    tokens of a `sequence`-token sequence split over `degree` ranks."""
    key = json.dumps(model, sort_keys=True)
    points = anchors(block_lengths(model), tokens)
    blocks = []
    for (window, _), layers in block_kinds(model).items():
        piece = _fit(lambda t, i=layers[0]: block_memory(key, device, dtype, i, t), tokens, points)
        exchange = context_exchange(model, dtype, layers[0], window, degree, sequence)
        blocks.append((layers, _add(piece, exchange)))
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
    span = shape.tokens // shape.micro
    blocks, outer = _pieces(
        model, shape.device, shape.dtype, span, shape.degree, shape.sequence or span
    )
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


def prefill_memory(
    model: Mapping[str, Any],
    device: str,
    dtype: str,
    tokens: int,
    degree: int = 1,
    cached: bool = False,
) -> Estimate:
    """Peak bytes of a forward pass without gradients over a `tokens`-token sequence, on each
    of `degree` ranks that split it (the plain model, as evaluation runs it): the weights, the
    residual stream and embeddings of a span, with `cached` the decode cache of the span, and
    the most that one block or the loss head holds at once."""
    act_bytes = 2 if dtype == "bf16" else FLOAT32
    weights = act_bytes * parameter_counts(model)["total"]  # bf16 only on a GPU
    span = longest_span(tokens, degree, model)
    stream = 2 * act_bytes * model["d_model"] * span  # residual stream and embeddings
    blocks, outer = _pieces(model, device, dtype, span, degree, tokens)
    peak = max([outer.inference, *(piece.inference for _, piece in blocks)])
    cache = 0.0
    if cached:
        cache = sum(
            len(layers) * cache_bytes(model, dtype, layers[0], span) for layers, _ in blocks
        )
    return _finish(device, weights, 0.0, stream, peak, cache)
