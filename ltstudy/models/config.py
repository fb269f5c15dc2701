"""Typed model configuration, built from the plain dict that a run spec carries."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TTTConfig:
    layers: tuple[int, ...] = ()
    chunk_size: int = 1024
    eta: float = 0.3
    conv_kernel: int = 5
    conv_padding: str = "chunk"  # chunk | causal
    target: str = "embeddings"  # embeddings | mlp_input
    w_target: bool = True
    clip_tau: float | None = None
    clip_order: str = "before_eta"  # before_eta (the paper: ||ΔW_i|| <= τ) | after_eta
    clip_at: str = "inference"  # inference | always (also while training)
    reset_at_documents: bool = False
    # the tokenizer's end-of-document id; documents start after it (filled from the run's
    # tokenizer when reset_at_documents is on)
    document_separator: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    variant: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    tie_embeddings: bool = False
    qk_norm: bool = False
    rope_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    swa_window: int | None = None
    mixer: dict[str, Any] = field(default_factory=dict)  # settings of the variant's own mixer
    pretrained: str | None = None  # Hugging Face checkpoint the weights start from
    ttt: TTTConfig | None = None
    norm_eps: float = 1e-6
    kernels: str = "auto"  # auto | reference | triton (ltstudy.ops.backend)
    init_std: float = 0.02

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        ttt = d.pop("ttt", None)
        if ttt is not None:
            ttt = TTTConfig(**{**ttt, "layers": tuple(ttt.get("layers", ()))})
        return cls(**d, ttt=ttt)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.ttt is not None:
            out["ttt"]["layers"] = list(self.ttt.layers)
        return out

    def has_ttt(self, layer_idx: int) -> bool:
        return self.ttt is not None and layer_idx in self.ttt.layers
