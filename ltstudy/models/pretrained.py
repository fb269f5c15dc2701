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

from ltstudy.models.hf_config import model_config, read_config
from ltstudy.models.transformer import LanguageModel, build_model


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{path}: neither model.safetensors nor model.safetensors.index.json"
        )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(path / name))
    return state


def from_pretrained(
    path: str | Path,
    ttt: bool | Mapping[str, Any] = False,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> LanguageModel:
    """A LanguageModel with the checkpoint's weights; `forward(input_ids)` gives logits."""
    model = build_model(model_config(read_config(path), ttt), seed=seed, device=device)
    load_weights(model, path)
    return model.to(dtype) if dtype is not None else model


def load_weights(model: LanguageModel, path: str | Path) -> None:
    """Copy a checkpoint's weights into `model` (its TTT parameters, if any, stay as they are)."""
    state = {name.removeprefix("model."): tensor for name, tensor in load_safetensors(path).items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [
        m
        for m in missing
        if not (".ttt_" in m or (m == "lm_head.weight" and model.cfg.tie_embeddings))
    ]
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
