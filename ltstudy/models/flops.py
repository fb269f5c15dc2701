"""Analytic FLOPs per token, by the convention MFU is usually reported in (PaLM, torchtitan).

A trained token costs 6·N + 12·L·H·Q·T: N the parameters except the input embedding table (so
the LM head counts, tied or not: it runs as a matmul), L layers of H attention heads of width Q
over a context of T. The attention term is not halved for causal masking (each query is counted
against all T keys); a sliding-window layer counts min(T, window) keys. The forward pass is a
third of that (2·N + 4·L·H·Q·T); decoding one token after T is the forward at T. Prefill as
throughput measures it stops at the final hidden states, so it leaves out the LM head.

Mixers without attention count the matmuls of their chunked form (masked chunk blocks counted
whole, as for attention): per token and head, GLA and Mamba2 2·C·(K+V) within the chunk plus
4·K·V for the state read and write; gated DeltaNet 2·C·(3K+2V) + 6·K·V (the WY pseudo-values and
the state correction); LaCT's fast-weight update 12·F·D (SwiGLU forward on k and its gradient;
applying the fast weights is in 2·N, as they are parameters), plus Newton-Schulz when Muon is on;
In-Place TTT 4·d·d_ff per TTT layer (the fast weight applied and written). Element-wise work
(norms, activations, softmax) is left out, as is usual.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ltstudy.models.variants import VARIANTS

NEWTON_SCHULZ_STEPS = 5  # ltstudy.ops.lact's Muon iterations


def attended_keys(context: int, window: int | None) -> int:
    """Keys each query is counted against: all of the context (no causal halving), or the window."""
    return context if window is None else min(context, window)


def _layer_window(model: Mapping[str, Any], layer: int) -> int | None:
    """As ltstudy.models.attention.layer_window (None = full attention)."""
    full_every = model["mixer"].get("full_every")
    if full_every and (layer + 1) % full_every == 0:
        return None
    return model["swa_window"]


def _newton_schulz(rows: int, cols: int) -> int:
    """FLOPs of Muon's orthogonalisation of one rows x cols matrix."""
    s, big = min(rows, cols), max(rows, cols)
    return NEWTON_SCHULZ_STEPS * (4 * s * s * big + 2 * s**3)


def mixer_context_flops(model: Mapping[str, Any], context: int) -> float:
    """Forward FLOPs per token that token mixers spend beyond their weights, at `context`."""
    settings, m = VARIANTS[model["variant"]].settings, model["mixer"]
    H, D = model["n_heads"], model["head_dim"]
    total = 0.0
    for layer in range(model["n_layers"]):
        if settings in (None, "hybrid", "lact"):  # scores and values: 2 matmuls of 2 FLOPs
            total += 4 * H * D * attended_keys(context, _layer_window(model, layer))
        if settings == "lact":
            F = m["hidden_ratio"] * D
            total += 12 * H * F * D
            if m.get("use_muon"):
                total += H * 3 * _newton_schulz(F, D) / m["chunk_size"]
        elif settings in ("gla", "mamba2"):
            if settings == "gla":
                K, V = m["key_dim"], m["value_dim"]
            else:
                K, V = m["d_state"], m["head_dim"]
            total += m["n_heads"] * (2 * m["chunk_size"] * (K + V) + 4 * K * V)
        elif settings == "deltanet":
            K = V = m["head_dim"]
            total += m["n_heads"] * (2 * m["chunk_size"] * (3 * K + 2 * V) + 6 * K * V)
    if model.get("ttt"):
        total += len(model["ttt"]["layers"]) * 4 * model["d_model"] * model["d_ff"]
    return total


def weight_params(model: Mapping[str, Any], params_total: int) -> int:
    """N of the convention: every parameter but the input embedding table (a tied table is
    counted once, as the LM head)."""
    embedding_table = 0 if model["tie_embeddings"] else model["vocab_size"] * model["d_model"]
    return params_total - embedding_table


def forward_flops_per_token(
    model: Mapping[str, Any], params_total: int, context: int, lm_head: bool = True
) -> float:
    """2·N + the mixers' context term; without the LM head's 2·vocab·d_model if asked."""
    head = 0 if lm_head else 2 * model["vocab_size"] * model["d_model"]
    return 2 * weight_params(model, params_total) - head + mixer_context_flops(model, context)


def flops_per_token(model: Mapping[str, Any], params_total: int, context: int, mode: str) -> float:
    """train: forward + backward (3x the forward); prefill: the forward without the LM head
    (throughput's prefill stops at the hidden states); decode: one step after `context`."""
    if mode == "train":
        return 3 * forward_flops_per_token(model, params_total, context)
    return forward_flops_per_token(model, params_total, context, lm_head=mode != "prefill")
