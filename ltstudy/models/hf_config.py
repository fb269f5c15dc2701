"""Hugging Face Llama / Qwen3 config.json -> our model config (torch-free)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SUPPORTED = ("llama", "qwen3")
TTT_DEFAULTS = {
    "chunk_size": 1024,
    "eta": 0.3,
    "every": 6,
    "layers": None,
    "conv_kernel": 5,
    "conv_padding": "chunk",
    "target": "mlp_input",
    "w_target": True,
    "clip_tau": None,
    "clip_order": "after_eta",
    "reset_at_documents": False,
}


def _rope(config: Mapping[str, Any]) -> tuple[float, dict | None]:
    """(base, scaling) from either the classic keys or transformers 5's `rope_parameters`."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    base = config.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return float(base), None
    names = {"linear": "linear", "dynamic": "dynamic", "yarn": "yarn", "llama3": "llama3"}
    if kind not in names:
        raise ValueError(f"rope scaling {kind!r} is not supported")
    scaling = {"type": names[kind], "factor": float(params["factor"])}
    if "original_max_position_embeddings" in params:
        scaling["original_context"] = int(params["original_max_position_embeddings"])
    elif kind in ("dynamic", "yarn", "llama3"):
        scaling["original_context"] = int(config["max_position_embeddings"])
    for key in (
        "low_freq_factor",
        "high_freq_factor",
        "beta_fast",
        "beta_slow",
        "attention_factor",
    ):
        if params.get(key) is not None:
            scaling[key] = float(params[key])
    return float(base), scaling


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no config.json (expected a Hugging Face checkpoint folder)"
        )
    return json.loads(path.read_text())


def model_config(
    config: Mapping[str, Any], ttt: bool | Mapping[str, Any] = False
) -> dict[str, Any]:
    """Our model config (a plain dict) of a Hugging Face config."""
    kind = config.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(
            f"model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError("checkpoints with attention or MLP biases are not supported")
    heads = config["num_attention_heads"]
    base, scaling = _rope(config)
    n_layers = config["num_hidden_layers"]
    model = {
        "variant": "ttt_full" if ttt else "full",
        "vocab_size": config["vocab_size"],
        "d_model": config["hidden_size"],
        "n_layers": n_layers,
        "n_heads": heads,
        "n_kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "d_ff": config["intermediate_size"],
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "qk_norm": kind == "qwen3",
        "rope_base": base,
        "rope_scaling": scaling,
        "swa_window": None,
        "mixer": {},
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "ttt": None,
    }
    if ttt:
        settings = {**TTT_DEFAULTS, **(ttt if isinstance(ttt, Mapping) else {})}
        layers = settings.pop("layers") or list(range(0, n_layers, settings["every"]))
        settings.pop("every")
        model["ttt"] = {**settings, "layers": sorted(i for i in set(layers) if i < n_layers)}
    return model
