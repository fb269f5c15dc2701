"""Load a local Hugging Face Llama or Qwen3 checkpoint into the `full` variant (or with In-Place
TTT added on top).

A checkpoint folder holds config.json and either model.safetensors or shards listed in
model.safetensors.index.json. Qwen3's QK-norm, tied embeddings and Llama-3's rope scaling carry
over. TTT parameters are new and start as an identity (zero conv), so a TTT model loaded this
way computes exactly the checkpoint's logits until it is trained.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ltstudy.models.config import ModelConfig
from ltstudy.models.hf_config import model_config, read_config
from ltstudy.models.transformer import LanguageModel, build_model, seeded_values
from ltstudy.parallel.materialize import Source, materialize
from ltstudy.parallel.parallelize import canonical_name


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def from_pretrained(
    path: str | Path,
    ttt: bool | Mapping[str, Any] = False,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> LanguageModel:
    """A LanguageModel with the checkpoint's weights; `forward(input_ids)` gives logits.

    The model is built on the meta device in `dtype` (float32 by default) and filled tensor by
    tensor from the memory-mapped shards, so loading holds one copy of the weights in `dtype`
    (an 8B model in bf16: 16 GB, not a float32 model and its cast). TTT's new parameters take
    their seeded float32 initial values, cast to `dtype`.
    """
    settings = model_config(read_config(path), ttt)
    if settings["ttt"] and settings["ttt"]["reset_at_documents"]:
        # Fast weights restart after each end-of-document token of the checkpoint's tokenizer.
        from ltstudy.data.tokenizer import get_tokenizer

        settings["ttt"].setdefault("document_separator", get_tokenizer(str(path)).eos_id)
    cfg = ModelConfig.from_dict(settings)
    model = build_model(cfg, seed=None, device="meta")
    if dtype is not None:
        model.to(dtype)
    seeded = seeded_values(cfg, seed)

    def initial(name: str, param: torch.Tensor) -> torch.Tensor:
        return seeded(name, torch.empty(param.shape, device=param.device))

    load_weights(model, path, device=device, fallback=initial)
    return model


def hf_name(name: str) -> str:
    """Our parameter name -> the checkpoint's (Hugging Face keeps the body under `model.`)."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def load_weights(
    model: LanguageModel,
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    fallback: Source | None = None,
) -> None:
    """Copy a checkpoint's weights into `model`, tensor by tensor, also into a sharded or meta
    model. One shard file at a time is memory-mapped, so loading adds about one shard to the
    model's own memory. Parameters the checkpoint lacks (TTT's) keep their values, or take
    `fallback`'s (a meta model has none)."""
    from safetensors import safe_open

    path = Path(path)
    where: dict[str, Path] = {}
    for file in _checkpoint_files(path):
        with safe_open(str(file), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    wanted = {canonical_name(n): hf_name(canonical_name(n)) for n, _ in model.named_parameters()}
    missing = [n for n, key in wanted.items() if key not in where and ".ttt_" not in n]
    unexpected = sorted(set(where) - set(wanted.values()) - {"lm_head.weight"})
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    current: dict[Path, Any] = {}  # the shard open now

    def source(name: str, param: torch.Tensor) -> torch.Tensor | None:
        key = wanted[name]
        if key not in where:
            return None if fallback is None else fallback(name, param)
        if where[key] not in current:
            current.clear()
            current[where[key]] = safe_open(str(where[key]), framework="pt")
        return current[where[key]].get_tensor(key)

    materialize(model, device or next(model.parameters()).device, source, str(path))
    current.clear()
