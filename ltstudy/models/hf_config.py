"""Hugging Face Llama / Qwen3 config.json -> our model config (torch-free).

Every field of config.json is either read (and its value checked against what our model
implements), or known not to change the computation (NEUTRAL), or rejected: a checkpoint whose
config asks for something we do not implement (another activation, biases, partial rotary,
sliding windows, an unknown RoPE variant or field) fails naming the field, rather than loading
into a model that silently computes something else than transformers does.
"""

from __future__ import annotations

import json
import math
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
    "clip_order": "before_eta",
    "clip_at": "inference",
    "reset_at_documents": False,
}

# Fields that describe the checkpoint or its use, not what the network computes.
NEUTRAL = frozenset(
    {
        "_name_or_path",
        "_attn_implementation_autoset",
        "architectures",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "initializer_range",
        "use_cache",
        "pretraining_tp",  # only splits the projections' matmuls, same sums
        "chunk_size_feed_forward",  # idem, along the sequence
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
    }
)
# Fields we read, for every supported model type.
READ = frozenset(
    {
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "original_max_position_embeddings",  # top level (Phi-3 style), for llama3 and yarn
        "rms_norm_eps",
        "tie_word_embeddings",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
    }
)
# Fields accepted at the value we implement (transformers' default), per model type.
FIXED: dict[str, dict[str, Any]] = {
    "llama": {
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "partial_rotary_factor": 1.0,
    },
    "qwen3": {
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "partial_rotary_factor": 1.0,
        "use_sliding_window": False,
    },
}
# Qwen3 fields that only matter with use_sliding_window (transformers ignores them without).
SLIDING_ONLY = frozenset({"sliding_window", "max_window_layers"})
# RoPE fields accepted at one value: partial rotary and yarn's untruncated ramp are not implemented.
ROPE_FIXED = {"partial_rotary_factor": 1.0, "truncate": True}
# RoPE fields each scaling type reads (besides rope_type/type and rope_theta).
ROPE_FIELDS = {
    "default": set(),
    "linear": {"factor"},
    # transformers' dynamic NTK grows the base from max_position_embeddings and ignores this
    "dynamic": {"factor", "original_max_position_embeddings"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
    },
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}

ROPE_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


def _unsupported(source: str, field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{source}: config field `{field}` = {value!r} is not supported ({why})")


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope(config: Mapping[str, Any], source: str) -> tuple[float, dict | None]:
    """(base, scaling) as transformers reads them: `rope_scaling` (4.x) before
    `rope_parameters` (5.x), a rope_theta inside them before the top-level one."""
    field = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    params = dict(config.get(field) or {})
    base = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_FIELDS:
        known = ", ".join(ROPE_FIELDS)
        raise _unsupported(source, f"{field}.rope_type", kind, f"known: {known}")
    for key, value in params.items():
        if key in ROPE_FIXED:
            if value is not None and value != ROPE_FIXED[key]:
                why = f"only {ROPE_FIXED[key]!r} is implemented"
                raise _unsupported(source, f"{field}.{key}", value, why)
        elif key not in ("rope_type", "type", "rope_theta") and key not in ROPE_FIELDS[kind]:
            raise _unsupported(source, f"{field}.{key}", value, f"not implemented for {kind}")
    for key in ROPE_REQUIRED.get(kind, ()):
        if params.get(key) is None:
            raise ValueError(f"{source}: config field `{field}.{key}` is missing ({kind} needs it)")
    if kind == "default":
        return base, None

    original = params.get("original_max_position_embeddings")
    if kind in ("llama3", "yarn"):
        # transformers takes a top-level original_max_position_embeddings first (Phi-3 style)
        original = config.get("original_max_position_embeddings", original)
        original = original or config["max_position_embeddings"]
    factor = params.get("factor")
    if factor is None and kind == "yarn":
        factor = config["max_position_embeddings"] / original
    scaling: dict[str, Any] = {"type": kind, "factor": float(factor)}
    if kind == "dynamic":  # transformers: the base grows once past max_position_embeddings
        scaling["original_context"] = int(config["max_position_embeddings"])
    elif kind in ("llama3", "yarn"):
        scaling["original_context"] = int(original)
    if kind == "llama3":
        scaling["low_freq_factor"] = float(params["low_freq_factor"])
        scaling["high_freq_factor"] = float(params["high_freq_factor"])
    if kind == "yarn":
        for key in ("beta_fast", "beta_slow"):  # transformers: `or` default, so 0 means default
            if params.get(key):
                scaling[key] = float(params[key])
        attention = params.get("attention_factor")
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if attention is None and mscale and mscale_all_dim:  # DeepSeek-style attention factor
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        if attention is not None:
            scaling["attention_factor"] = float(attention)
    return base, scaling


def check_fields(config: Mapping[str, Any], source: str = "config.json") -> None:
    """Reject a config that asks for a computation our model does not implement."""
    kind = config.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(
            f"{source}: model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    fixed = FIXED[kind]
    sliding = SLIDING_ONLY if kind == "qwen3" else frozenset()
    for field, value in config.items():
        if field in NEUTRAL or field in READ or field in sliding:
            continue
        if field == "layer_types" and kind == "qwen3":
            if any(t != "full_attention" for t in value or []):
                raise _unsupported(source, field, value, "only full_attention layers")
            continue
        if field not in fixed:
            raise ValueError(
                f"{source}: config field `{field}` is not understood by the {kind} loader "
                "(it may change the computation; add it to hf_config.NEUTRAL if it does not)"
            )
        if value is not None and value != fixed[field]:
            raise _unsupported(source, field, value, f"only {fixed[field]!r} is implemented")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if head_dim % 2:
        raise _unsupported(source, "head_dim", head_dim, "RoPE needs an even head dimension")
    kv_heads = config.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise _unsupported(
            source, "num_key_value_heads", kv_heads, f"must divide num_attention_heads={heads}"
        )
    _rope(config, source)


def read_config(path: str | Path) -> dict[str, Any]:
    """A checkpoint folder's config.json, checked (errors name the file)."""
    path = Path(path) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no config.json (expected a Hugging Face checkpoint folder)"
        )
    config = json.loads(path.read_text())
    check_fields(config, str(path))
    return config


def model_config(
    config: Mapping[str, Any], ttt: bool | Mapping[str, Any] = False, source: str = "config.json"
) -> dict[str, Any]:
    """Our model config (a plain dict) of a Hugging Face config."""
    check_fields(config, source)
    kind = config["model_type"]
    heads = config["num_attention_heads"]
    base, scaling = _rope(config, source)
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
