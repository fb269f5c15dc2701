"""Default settings of each mixer, their parameter counts, and width matching.

At every size all variants are matched to `full` in parameter count by choosing the number of
heads of the mixer (never the layer count). Counts here are analytic so that config resolution
stays torch-free; a test checks them against the real modules built on the meta device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MIXER_DEFAULTS: dict[str, dict[str, Any]] = {
    "hybrid": {"full_every": 4},
    "gla": {
        "n_heads": None,
        "key_dim": None,
        "value_dim": None,
        "gate_rank": 16,
        "gate_normalizer": 16,
        "chunk_size": 16,
    },
    "deltanet": {"n_heads": None, "head_dim": None, "conv_size": 4, "chunk_size": 64},
    "mamba2": {
        "n_heads": None,
        "head_dim": 64,
        "d_state": 128,
        "n_groups": 1,
        "conv_size": 4,
        "chunk_size": 64,
    },
    "lact": {  # the official LaCT LM's defaults (a1600012888/LaCT, LaCTSWIGLUConfig)
        "chunk_size": 2048,
        "hidden_ratio": 1,
        "base_lr": 0.001,
        "use_muon": False,
        "use_momentum": True,
        "v_silu": True,
        "fast_rope": True,
        "qk_scale_offset": True,
        "learnable_ttt_scale": True,
    },
}


def attention_parameters(dims: Mapping[str, Any]) -> int:
    d, H, Hkv, hd = dims["d_model"], dims["n_heads"], dims["n_kv_heads"], dims["head_dim"]
    return 2 * d * H * hd + 2 * d * Hkv * hd + (2 * hd if dims["qk_norm"] else 0)


def mixer_parameters(
    settings_name: str | None, dims: Mapping[str, Any], m: Mapping[str, Any]
) -> int:
    """Parameters of one layer's token mixer."""
    d = dims["d_model"]
    if settings_name in (None, "hybrid"):
        return attention_parameters(dims)
    if settings_name == "lact":
        H, hd = dims["n_heads"], dims["head_dim"]
        fast = 3 * H * m["hidden_ratio"] * hd * hd + 3 * (d + 1) * H + hd  # W1-3, lr_proj, norm
        fast += 4 * H * hd if m["qk_scale_offset"] else 0
        fast += (d + 1) * H * (int(m["use_momentum"]) + int(m["learnable_ttt_scale"]))
        return attention_parameters(dims) + fast
    H = m["n_heads"]
    if settings_name == "gla":
        hk, hv = H * m["key_dim"], H * m["value_dim"]
        return (
            2 * d * hk + 3 * d * hv + d * m["gate_rank"] + m["gate_rank"] * hk + hk + m["value_dim"]
        )
    if settings_name == "deltanet":
        inner = H * m["head_dim"]
        return 5 * d * inner + 2 * d * H + 2 * H + 3 * inner * (m["conv_size"] + 1) + m["head_dim"]
    if settings_name == "mamba2":
        inner = H * m["head_dim"]
        channels = inner + 2 * m["n_groups"] * m["d_state"]
        return (
            d * (inner + channels + H) + channels * (m["conv_size"] + 1) + 3 * H + inner + inner * d
        )
    raise KeyError(settings_name)


def resolve_mixer(
    settings_name: str | None, dims: Mapping[str, Any], overrides: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Defaults, then the config's values; a missing head count is chosen to match attention."""
    if settings_name is None:
        return {}
    m = {
        **MIXER_DEFAULTS[settings_name],
        **{k: v for k, v in (overrides or {}).items() if v is not None},
    }
    if settings_name == "gla":
        m["key_dim"] = m["key_dim"] or dims["head_dim"] // 2
        m["value_dim"] = m["value_dim"] or dims["head_dim"]
    if settings_name == "deltanet":
        m["head_dim"] = m["head_dim"] or dims["head_dim"]
    if "n_heads" in m and m["n_heads"] is None:
        target = attention_parameters(dims)
        step = m.get("n_groups", 1)
        candidates = range(step, 8 * dims["n_heads"] + step, step)
        m["n_heads"] = min(
            candidates,
            key=lambda h: abs(mixer_parameters(settings_name, dims, {**m, "n_heads": h}) - target),
        )
    return m
