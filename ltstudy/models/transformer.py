"""The decoder language model shared by every variant.

Pre-norm blocks (RMSNorm -> token mixer -> residual, RMSNorm -> MLP -> residual), SwiGLU MLPs,
rotary positions, untied or tied LM head. Only the token mixer (picked from the variant registry)
and, on In-Place TTT layers, the MLP differ between variants. Parameter names follow Hugging
Face's Llama/Qwen3 layout.
"""

from __future__ import annotations

import importlib
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ltstudy.models.config import ModelConfig
from ltstudy.models.layers import RMSNorm, Rotary, SwiGLU
from ltstudy.models.ttt import InPlaceTTTMLP
from ltstudy.models.variants import VARIANTS


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
            self.mlp = InPlaceTTTMLP(cfg.d_model, cfg.d_ff, cfg.ttt)
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: Tensor, embeddings: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, InPlaceTTTMLP):
            return x + self.mlp(h, embeddings)
        return x + self.mlp(h)


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)

    def hidden_states(self, input_ids: Tensor) -> Tensor:
        """Final normalised hidden states [B, T, d_model]."""
        embeddings = self.embed_tokens(input_ids)
        rope = self.rotary(input_ids.shape[1], input_ids.device)
        x = embeddings
        for layer in self.layers:
            x = layer(x, embeddings, rope)
        return self.norm(x)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits [B, T, vocab]."""
        return self.lm_head(self.hidden_states(input_ids))

    def token_losses(self, input_ids: Tensor, labels: Tensor, chunk: int = 4096) -> Tensor:
        """Per-token cross-entropy [B, T] (0 where labels == -100).

        The LM head and softmax run in chunks of tokens, recomputed in the backward pass, so
        the [T, vocab] logits of a long sequence never exist all at once.
        """
        hidden = self.hidden_states(input_ids)
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


def build_model(cfg: ModelConfig | dict, *, seed: int | None = 0, device=None) -> LanguageModel:
    """Construct a model; with a seed, initialise it (see `init_weights`)."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    with torch.device(device or "cpu"):
        model = LanguageModel(cfg)
    if seed is not None and str(device) != "meta":
        init_weights(model, seed)
    return model


@torch.no_grad()
def init_weights(model: LanguageModel, seed: int) -> None:
    """Initialise every parameter from its own generator, seeded by (seed, parameter name).

    So a parameter's initial value depends only on the seed and its name: `full` and `ttt_full`
    built with the same seed share their backbone weights exactly, which makes variant
    comparisons paired and the TTT-at-init identity testable.
    """
    cfg = model.cfg
    std = cfg.init_std
    for name, p in model.named_parameters():
        g = torch.Generator(device=p.device).manual_seed(
            seed * 1_000_003 + zlib.crc32(name.encode())
        )
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            p.fill_(1.0)
        elif "ttt_conv" in name:
            p.zero_()
        elif "ttt_proj" in name:
            p.zero_()
            p.diagonal().normal_(0.0, std, generator=g)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            p.normal_(0.0, std / (2 * cfg.n_layers) ** 0.5, generator=g)
        else:
            p.normal_(0.0, std, generator=g)


def count_parameters(cfg: ModelConfig | dict) -> dict[str, int]:
    """Parameter counts from a model built on the meta device (no memory is allocated)."""
    model = build_model(cfg, seed=None, device="meta")
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel()
    if not model.cfg.tie_embeddings:
        embedding += model.lm_head.weight.numel()
    return {"total": total, "non_embedding": total - embedding}
