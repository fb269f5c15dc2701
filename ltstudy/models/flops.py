"""Analytic forward FLOPs per token, as a function of the context length.

Two parts: 2 FLOPs per weight used in a matmul (every parameter except the input embedding
table), and each mixer's context term (what attention spends on scores and values, what a
recurrent state spends on reads and writes). Averages are over the positions of a causal
sequence of length `context`. A training step costs about 3x the forward. Element-wise work
(norms, activations, softmax) is left out, as is usual for MFU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ltstudy.models.variants import VARIANTS


def mean_keys(context: int, window: int | None, decode: bool = False) -> float:
    """Keys a query attends to: averaged over positions 1..context, or (decode) at the last."""
    if decode:
        return context if window is None else min(context, window)
    if window is None or window >= context:
        return (context + 1) / 2
    return window - window * (window - 1) / (2 * context)


def _attention(model: Mapping[str, Any], context: int, window: int | None, decode: bool) -> float:
    return 4 * model["n_heads"] * model["head_dim"] * mean_keys(context, window, decode)


def _layer_window(model: Mapping[str, Any], layer: int) -> int | None:
    full_every = model["mixer"].get("full_every")
    if full_every and (layer + 1) % full_every == 0:
        return None
    return model["swa_window"]


def mixer_context_flops(model: Mapping[str, Any], context: int, decode: bool = False) -> float:
    """Forward FLOPs per token spent by all token mixers beyond their projections (decode: for
    one new token after `context` tokens)."""
    settings, m = VARIANTS[model["variant"]].settings, model["mixer"]
    total = 0.0
    for layer in range(model["n_layers"]):
        if settings in (None, "hybrid", "lact"):
            total += _attention(model, context, _layer_window(model, layer), decode)
        if settings == "lact":  # apply f_W (3 matmuls) and its gradient step (about 2x that)
            hidden = m["hidden_ratio"] * model["head_dim"]
            total += 3 * 6 * model["n_heads"] * hidden * model["head_dim"]
        elif settings == "gla":  # intra-chunk scores and values + state read and write
            K, V, C = m["key_dim"], m["value_dim"], m["chunk_size"]
            total += m["n_heads"] * (4 * K * V + C * (2 * K + V))
        elif settings == "deltanet":  # as GLA plus the state correction (k·S) per token
            K = V = m["head_dim"]
            total += m["n_heads"] * (6 * K * V + m["chunk_size"] * (3 * K + V))
        elif settings == "mamba2":
            N, P = m["d_state"], m["head_dim"]
            total += m["n_heads"] * (4 * N * P + m["chunk_size"] * (N + P))
    if model.get("ttt"):  # fast weight applied (z·Sᵀ) and written (v̂ᵀz) per token
        total += len(model["ttt"]["layers"]) * 4 * model["d_model"] * model["d_ff"]
    return total


def forward_flops_per_token(
    model: Mapping[str, Any], params_total: int, context: int, decode: bool = False
) -> float:
    embedding_table = 0 if model["tie_embeddings"] else model["vocab_size"] * model["d_model"]
    return 2 * (params_total - embedding_table) + mixer_context_flops(model, context, decode)


def flops_per_token(model: Mapping[str, Any], params_total: int, context: int, mode: str) -> float:
    """train: forward + backward (3x forward); prefill: forward; decode: one step at context."""
    if mode == "train":
        return 3 * forward_flops_per_token(model, params_total, context)
    return forward_flops_per_token(model, params_total, context, decode=mode == "decode")
