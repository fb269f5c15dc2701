"""Named model sizes and the resolution of a run's model settings into a full model config.

The large presets follow study-design.md (the paper's from-scratch models and the Qwen3 /
Llama-3.1 architectures); `demo` and `micro` are tiny presets for CPU runs and tests. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ltstudy.data.tokenizer import tokenizer_vocab_size
from ltstudy.models.hf_config import model_config, read_config
from ltstudy.models.mixer_sizes import resolve_mixer
from ltstudy.models.variants import VARIANTS, Variant

_PAPER = {"vocab_size": 32000, "tie_embeddings": False, "qk_norm": False, "rope_base": 1e6}
_QWEN3 = {"vocab_size": 151936, "qk_norm": True, "rope_base": 1e6, "swa_window": 4096}
_TINY = {"vocab_size": None, "tie_embeddings": False, "qk_norm": False, "rope_base": 10000.0}

SIZES: dict[str, dict[str, Any]] = {
    "500M": {
        **_PAPER,
        "d_model": 1024,
        "n_layers": 24,
        "n_heads": 8,
        "n_kv_heads": 8,
        "head_dim": 128,
        "d_ff": 3072,
        "swa_window": 2048,
    },
    "1.5B": {
        **_PAPER,
        "d_model": 2048,
        "n_layers": 24,
        "n_heads": 16,
        "n_kv_heads": 16,
        "head_dim": 128,
        "d_ff": 6144,
        "swa_window": 4096,
    },
    "4B": {
        **_QWEN3,
        "d_model": 2560,
        "n_layers": 36,
        "n_heads": 32,
        "n_kv_heads": 8,
        "head_dim": 128,
        "d_ff": 9728,
        "tie_embeddings": True,
    },
    "8B": {
        "d_model": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "head_dim": 128,
        "d_ff": 14336,
        "vocab_size": 128256,
        "tie_embeddings": False,
        "qk_norm": False,
        "rope_base": 500000.0,
        "swa_window": 4096,
    },
    "14B": {
        **_QWEN3,
        "d_model": 5120,
        "n_layers": 40,
        "n_heads": 40,
        "n_kv_heads": 8,
        "head_dim": 128,
        "d_ff": 17408,
        "tie_embeddings": False,
    },
    "demo": {
        **_TINY,
        "d_model": 128,
        "n_layers": 4,
        "n_heads": 4,
        "n_kv_heads": 2,
        "head_dim": 32,
        "d_ff": 384,
        "swa_window": 64,
        "mixers": {"mamba2": {"head_dim": 32, "d_state": 32}, "lact": {"chunk_size": 64}},
    },
    "micro": {
        **_TINY,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 2,
        "n_kv_heads": 1,
        "head_dim": 16,
        "d_ff": 64,
        "swa_window": 8,
        "mixers": {
            "mamba2": {"head_dim": 8, "d_state": 8},
            "lact": {"chunk_size": 8},  # chunks no longer than the window
            "gla": {"chunk_size": 8},
            "deltanet": {"chunk_size": 16},
            "hybrid": {"full_every": 2},
        },
    },
}
_SIZE_DEFAULTS = {
    "mixers": {},
    "vocab_size": None,
    "tie_embeddings": False,
    "qk_norm": False,
    "rope_base": 10000.0,
    "swa_window": 4096,
}


def resolve_model(
    variant: str,
    size: str,
    overrides: Mapping[str, Any],
    extra_sizes: Mapping[str, Mapping[str, Any]] | None = None,
    tokenizer: str = "bytes",
    context: int | None = None,
) -> dict[str, Any]:
    """The complete model config (a plain dict) of one run.

    Raises KeyError for an unknown size and ValueError for inconsistent settings.
    """
    spec = VARIANTS[variant]
    pretrained = overrides.get("pretrained")
    if pretrained:
        dims = _pretrained_dims(pretrained, spec)
    else:
        sizes = {**SIZES, **(extra_sizes or {})}
        if size not in sizes:
            raise KeyError(f"unknown size {size!r} (known: {', '.join(sizes)})")
        dims = {**_SIZE_DEFAULTS, **sizes[size]}
    preset_mixers = dims.pop("mixers", {})
    vocab = tokenizer_vocab_size(tokenizer)
    if dims["vocab_size"] is None:
        dims["vocab_size"] = vocab
    elif dims["vocab_size"] < vocab:
        raise ValueError(f"size {size!r} has vocab_size {dims['vocab_size']} < tokenizer's {vocab}")
    for key in ("rope_base", "qk_norm", "swa_window"):
        if overrides.get(key) is not None:
            dims[key] = overrides[key]
    if dims["n_heads"] % dims["n_kv_heads"]:
        raise ValueError(f"n_heads {dims['n_heads']} is not a multiple of n_kv_heads")
    model = {"variant": variant, **dims}
    if not spec.windowed:
        model["swa_window"] = None
    if overrides.get("rope_scaling") or not pretrained:
        model["rope_scaling"] = resolve_rope_scaling(overrides.get("rope_scaling"), context)
    model["pretrained"] = pretrained
    model["kernels"] = overrides.get("kernels") or "auto"
    mixer_overrides = {
        **preset_mixers.get(spec.settings, {}),
        **{k: v for k, v in (overrides.get(spec.settings or "") or {}).items() if v is not None},
    }
    model["mixer"] = resolve_mixer(spec.settings, dims, mixer_overrides)
    if spec.settings == "mamba2" and model["mixer"]["n_heads"] % model["mixer"]["n_groups"]:
        raise ValueError("mamba2.n_heads must be a multiple of mamba2.n_groups")
    model["ttt"] = (
        _resolve_ttt(dict(overrides.get("ttt", {})), dims["n_layers"]) if spec.ttt else None
    )
    return model


def _pretrained_dims(path: str, spec: Variant) -> dict[str, Any]:
    """Model dimensions of a Hugging Face checkpoint (the size preset is then only a label)."""
    if spec.settings is not None:
        raise ValueError("a pretrained checkpoint loads into attention variants only")
    try:
        hf = model_config(read_config(path))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"pretrained: {err}") from None
    keep = (
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "d_ff",
        "tie_embeddings",
        "qk_norm",
        "rope_base",
        "rope_scaling",
        "norm_eps",
    )
    return {**{k: hf[k] for k in keep}, "swa_window": 4096}


def resolve_rope_scaling(scaling: Mapping[str, Any] | None, context: int | None) -> dict | None:
    """Fill a scaling method's original context (default: the training context)."""
    if not scaling:
        return None
    out = {k: v for k, v in scaling.items() if v is not None}
    if out.get("original_context") is None and out["type"] in ("dynamic", "yarn", "llama3"):
        if context is None:
            raise ValueError(f"rope_scaling {out['type']} needs original_context")
        out["original_context"] = context
    return out


def _resolve_ttt(ttt: dict[str, Any], n_layers: int) -> dict[str, Any]:
    layers = ttt.get("layers")
    if layers is None:
        layers = list(range(0, n_layers, ttt["every"]))
    bad = [i for i in layers if i >= n_layers]
    if bad:
        raise ValueError(f"ttt.layers {bad} out of range for {n_layers} layers")
    ttt["layers"] = sorted(set(layers))
    ttt.pop("every", None)
    return ttt
