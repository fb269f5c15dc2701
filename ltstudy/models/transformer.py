"""The decoder language model shared by every variant.

Pre-norm blocks (RMSNorm -> token mixer -> residual, RMSNorm -> MLP -> residual), SwiGLU MLPs,
rotary positions, untied or tied LM head. Only the token mixer (picked from the variant registry)
and, on In-Place TTT layers, the MLP differ between variants. Parameter names follow Hugging
Face's Llama/Qwen3 layout.
"""

from __future__ import annotations

import importlib
import math
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ltstudy.models.config import ModelConfig
from ltstudy.models.layers import RMSNorm, SwiGLU
from ltstudy.models.rope import Rotary
from ltstudy.models.ttt import InPlaceTTTMLP
from ltstudy.models.variants import VARIANTS
from ltstudy.parallel.context import ContextParallel


def mixer_class(variant: str) -> type[nn.Module]:
    module, name = VARIANTS[variant].mixer.split(":")
    return getattr(importlib.import_module(module), name)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = mixer_class(cfg.variant)(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.has_ttt(layer_idx):
            self.mlp = InPlaceTTTMLP(cfg.d_model, cfg.d_ff, cfg.ttt, cfg.kernels)
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(
        self,
        x: Tensor,
        embeddings: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: dict | None = None,
        doc_starts: Tensor | None = None,
        context: ContextParallel | None = None,
    ) -> Tensor:
        mixer_cache = None if cache is None else cache.setdefault("mixer", {})
        x = x + self.self_attn(self.input_layernorm(x), rope, mixer_cache, context=context)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, InPlaceTTTMLP):
            mlp_cache = None if cache is None else cache.setdefault("mlp", {})
            return x + self.mlp(h, embeddings, mlp_cache, doc_starts, context=context)
        return x + self.mlp(h)


@dataclass
class Cache:
    """Decoding state: per layer what its mixer and MLP keep, the tokens seen so far and, per
    row, whether the last one ended a document (so the next call's first token starts one)."""

    layers: list[dict] = field(default_factory=list)
    position: int = 0
    ended_document: Tensor | None = None


def share_prefill_cache(cache: Cache, context: ContextParallel, device: torch.device) -> None:
    """After a split prefill: every layer's decode state as the last rank has it, on every
    rank, except caches spread over the ranks on purpose (full attention's keys and values,
    which hold their context)."""
    for layer in cache.layers:
        kept = {k: v for k, v in layer.items() if not (isinstance(v, dict) and "context" in v)}
        for key in kept:
            del layer[key]
        layer.update(context.from_last(kept, device))


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)

    def tie_weights(self) -> None:
        """Share the embedding table with the LM head (again: moving a meta model to a device
        gives each module its own new tensor)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self) -> Cache:
        return Cache(layers=[{} for _ in self.layers])

    def set_rope_scaling(self, scaling: dict | None) -> None:
        """Change the position extension method (e.g. YaRN for one evaluation length)."""
        self.rotary = Rotary(self.cfg.head_dim, self.cfg.rope_base, scaling)

    def document_starts(self, input_ids: Tensor, cache: Cache | None = None) -> Tensor | None:
        """Where documents begin [B, T] (bool), for TTT layers that reset their fast weights
        there (None when none does): the first token of a sequence and every token after the
        tokenizer's end-of-document id, also across the calls of a cached stream."""
        ttt = self.cfg.ttt
        if ttt is None or not ttt.reset_at_documents:
            return None
        if ttt.document_separator is None:
            raise ValueError(
                "model.ttt.reset_at_documents needs the end-of-document token id: set "
                "ttt.document_separator to the tokenizer's eos_id"
            )
        ends = input_ids == ttt.document_separator
        starts = torch.zeros_like(ends)
        starts[:, 1:] = ends[:, :-1]
        if cache is None or cache.ended_document is None:
            starts[:, 0] = True
        else:
            starts[:, 0] = cache.ended_document
        if cache is not None:
            cache.ended_document = ends[:, -1]
        return starts

    def hidden_states(
        self,
        input_ids: Tensor,
        cache: Cache | None = None,
        context: ContextParallel | None = None,
    ) -> Tensor:
        """Final normalised hidden states [B, T, d_model]. With a cache, input_ids continue the
        sequence the cache has seen, and the cache is updated.

        With a context, input_ids are this rank's span of a sequence split over the context
        group (see `ltstudy.parallel.context`). With a context and an empty cache this is a
        split prefill: afterwards every rank's cache continues the whole sequence (full
        attention's keys stay spread over the ranks, every other state is the last rank's),
        and decoding goes on with the same tokens on every rank, without a context."""
        start = 0 if cache is None else cache.position
        if context is not None and cache is not None and cache.position:
            raise ValueError("a context-parallel prefill starts from an empty cache")
        if context is not None:
            if self.cfg.ttt is not None and self.cfg.ttt.reset_at_documents:
                raise NotImplementedError(
                    "model.ttt.reset_at_documents with context parallelism (parallel.context > 1)"
                )
            start += context.offset
        doc_starts = self.document_starts(input_ids, cache)
        embeddings = self.embed_tokens(input_ids)
        rope = self.rotary(start, input_ids.shape[1], input_ids.device)
        x = embeddings
        for index, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[index]
            x = layer(x, embeddings, rope, layer_cache, doc_starts, context=context)
        if cache is not None and context is not None:
            cache.position = sum(context.spans)
            share_prefill_cache(cache, context, x.device)
        elif cache is not None:
            cache.position += input_ids.shape[1]
        return self.norm(x)

    def forward(self, input_ids: Tensor, cache: Cache | None = None) -> Tensor:
        """Logits [B, T, vocab]."""
        return self.lm_head(self.hidden_states(input_ids, cache))

    def logits_at(
        self, input_ids: Tensor, positions: int | list[int] | Tensor, cache: Cache | None = None
    ) -> Tensor:
        """Logits [B, len(positions), vocab] at the given positions of input_ids only (negative
        counts from the end), as `forward` otherwise: a prefill that decodes from its last
        token never holds the [T, vocab] logits of the whole prompt."""
        hidden = self.hidden_states(input_ids, cache)
        index = torch.as_tensor(positions, device=hidden.device).reshape(-1)
        return self.lm_head(hidden[:, index])

    def token_losses(
        self,
        input_ids: Tensor,
        labels: Tensor,
        chunk: int | None = None,
        context: ContextParallel | None = None,
    ) -> Tensor:
        """Per-token cross-entropy [B, T] (0 where labels == -100); with a context, of this
        rank's span.

        The LM head and softmax run in chunks of tokens, recomputed in the backward pass, so
        the [T, vocab] logits of a long sequence never exist all at once; by default a chunk
        holds about 2^26 logits whatever the vocabulary (2,048 tokens at 32K, 256 at 152K).
        """
        chunk = chunk or loss_chunk(self.cfg.vocab_size)
        hidden = self.hidden_states(input_ids, context=context)
        pieces = []
        for start in range(0, hidden.shape[1], chunk):
            h, y = hidden[:, start : start + chunk], labels[:, start : start + chunk]
            if torch.is_grad_enabled() and hidden.shape[1] > chunk:
                pieces.append(checkpoint(self._chunk_loss, h, y, use_reentrant=False))
            else:
                pieces.append(self._chunk_loss(h, y))
        return torch.cat(pieces, dim=1)

    def _chunk_loss(self, h: Tensor, y: Tensor) -> Tensor:
        logits = self.lm_head(h)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
        return F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100, reduction="none")


def loss_chunk(vocab_size: int) -> int:
    """Tokens per loss-head chunk: a power of two with about 2^26 logits, at least 256."""
    return max(256, 1 << ((1 << 26) // vocab_size).bit_length() - 1)


def build_model(cfg: ModelConfig | dict, *, seed: int | None = 0, device=None) -> LanguageModel:
    """Construct a model; with a seed, initialise it (see `seeded_values`)."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    with torch.device(device or "cpu"):
        model = LanguageModel(cfg)
    if seed is not None and str(device) != "meta":
        init_weights(model, seed)
    return model


def init_weights(model: LanguageModel, seed: int) -> None:
    from ltstudy.parallel.materialize import materialize

    materialize(model, next(model.parameters()).device, seeded_values(model.cfg, seed))


def seeded_values(cfg: ModelConfig, seed: int):
    """Initial values by parameter name: each from its own generator, seeded by (seed, name).

    So a parameter's initial value depends only on the seed and its name, not on the other
    parameters or on how the model is sharded: `full` and `ttt_full` built with the same seed
    share their backbone weights exactly, which makes variant comparisons paired and the
    TTT-at-init identity testable. Values are drawn on the parameter's device.
    """
    std = cfg.init_std

    def value(name: str, param: Tensor) -> Tensor:
        device = param.device
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        p = torch.empty(param.shape, dtype=param.dtype, device=device)
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("norm.weight") or name.endswith("layernorm.weight") or leaf == "D":
            return p.fill_(1.0)
        if "ttt_conv" in name or leaf == "bias":
            return p.zero_()
        if "ttt_proj" in name:
            p.zero_()
            p.diagonal().normal_(0.0, std, generator=g)
            return p
        if leaf == "A_log":  # decay rates A in [1, 16], as in Mamba2
            return p.uniform_(1, 16, generator=g).log_()
        if leaf == "dt_bias":  # softplus(dt_bias) = dt, log-uniform in [1e-3, 1e-1]
            dt = p.uniform_(math.log(1e-3), math.log(1e-1), generator=g).exp()
            return dt + torch.log(-torch.expm1(-dt))
        if leaf in ("w1", "w2", "w3") or (leaf == "weight" and "conv" in name):
            return p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)  # LaCT fast weights, convs
        if name.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight")):
            return p.normal_(0.0, std / (2 * cfg.n_layers) ** 0.5, generator=g)
        return p.normal_(0.0, std, generator=g)

    return value


def count_parameters(cfg: ModelConfig | dict) -> dict[str, int]:
    """Parameter counts from a model built on the meta device (no memory is allocated)."""
    model = build_model(cfg, seed=None, device="meta")
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel()
    if not model.cfg.tie_embeddings:
        embedding += model.lm_head.weight.numel()
    return {"total": total, "non_embedding": total - embedding}
