"""Gated linear attention: a matrix state decayed by a gate, written with k vᵀ, read with q.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ        o_t = scale · q_tᵀ S_t

`g` is a log-decay (<= 0). With a gate per key dimension (g: [B, H, T, K]) this is GLA; with one
gate per head (g: [B, H, T]) it is Mamba2's SSD (q = C, k = B, v = x·dt, g = A·dt).

Inputs are [batch, heads, time, dim]; the state is [batch, heads, K, V]. Each op returns
(output, final_state). The chunkwise forms compute within-chunk interactions in parallel and pass
the state between chunks; `recurrent_*` are the token-by-token references (and the decode step).
Decay factors only ever appear as exp(<= 0), so no form overflows.

Every token step is affine in the state, so a whole span maps its entry state S to
transition·S + bias (`*_span_summary`, `decay_fold`): with a `ContextParallel` the chunk forms
start from the state folded from the earlier spans' summaries (LASP-2, fla's `ops/cp`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from ltstudy.parallel.context import ContextParallel


def _pad_time(x: Tensor, multiple: int) -> Tensor:
    pad = -x.shape[2] % multiple
    if not pad:
        return x
    return F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))


def _chunks(x: Tensor, chunk_size: int) -> Tensor:
    """[B, H, T, ...] -> [B, H, N, C, ...], zero-padding T to a multiple of C (a zero log-decay
    and zero keys/values leave the state unchanged)."""
    return _pad_time(x, chunk_size).unflatten(2, (-1, chunk_size))


def _pairwise_decay(b: Tensor) -> Tensor:
    """exp(b_t - b_s) for s <= t (0 above the diagonal) from cumulative log decays b: [..., C]."""
    C = b.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=b.device).tril()
    return (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()


def _initial_state(q: Tensor, v: Tensor, state: Tensor | None) -> Tensor:
    B, H, _, K = q.shape
    if state is None:
        return q.new_zeros(B, H, K, v.shape[-1])
    return state.to(q.dtype)


def recurrent_gla(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Reference: one token at a time. g is [B,H,T,K] (per key) or [B,H,T] (per head)."""
    S = _initial_state(q, v, state)
    if g.dim() == 3:
        g = g[..., None].expand_as(k)
    outputs = []
    for t in range(q.shape[2]):
        S = g[:, :, t, :, None].exp() * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t] * scale, S))
    return torch.stack(outputs, dim=2), S


def _scan_chunks(
    q_decayed: Tensor, k_to_end: Tensor, v: Tensor, chunk_decay: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """Pass the state across chunks: returns the inter-chunk output [B,H,N,C,V] and the final
    state. chunk_decay is [B,H,N,K] (per key) and broadcasts over V."""
    outputs = []
    for n in range(q_decayed.shape[2]):
        outputs.append(q_decayed[:, :, n] @ state)
        state = (
            chunk_decay[:, :, n, :, None] * state + k_to_end[:, :, n].transpose(-1, -2) @ v[:, :, n]
        )
    return torch.stack(outputs, dim=2), state


def _span_summary(k: Tensor, v: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(transition, bias) of a span from its chunked keys and values [B,H,N,C,·] and the
    within-chunk cumulative log decays b ([B,H,N,C,K] per key, [B,H,N,C] per head): each write
    decays to the span's end, chunk by chunk (a cumsum over the whole span would lose the
    small differences of large sums)."""
    last = b[:, :, :, -1:]  # each chunk's log decay
    later = torch.cat(
        [last[:, :, 1:].flip(2).cumsum(2).flip(2), torch.zeros_like(last[:, :, :1])], 2
    )
    to_end = last - b + later  # from each position to the span's end
    if b.dim() < k.dim():
        to_end = to_end[..., None]
    bias = (k * to_end.exp()).flatten(2, 3).transpose(-1, -2) @ v.flatten(2, 3)
    return last.sum(2).squeeze(2).exp(), bias


def decay_fold(state: Tensor, summary: tuple[Tensor, ...]) -> Tensor:
    """A span's map on the state entering it: the span's decay (per key [B,H,K] or per head
    [B,H]), then its writes."""
    transition, bias = summary
    transition = transition.reshape(*transition.shape, *[1] * (state.dim() - transition.dim()))
    return transition * state + bias


def gla_span_summary(
    k: Tensor, v: Tensor, g: Tensor, chunk_size: int = 16
) -> tuple[Tensor, Tensor]:
    """(transition, bias [B,H,K,V]) of a span: it maps its entry state S to
    `decay_fold(S, (transition, bias))`, bias being the final state from a zero entry state.
    g is [B,H,T,K] (GLA: transition [B,H,K]) or [B,H,T] (SSD: transition [B,H])."""
    k, v, g = (_chunks(x, chunk_size) for x in (k, v, g))
    return _span_summary(k, v, g.cumsum(dim=3))


def chunk_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    state: Tensor | None = None,
    chunk_size: int = 16,
    context: ContextParallel | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunkwise GLA with a gate per key dimension (g: [B, H, T, K]).

    Within a chunk the decay between positions s <= t, exp(b_t - b_s) per key dimension,
    factors into exp(b_t - b_r) exp(b_r - b_s) about a reference position r, so it folds into
    the queries and keys and the scores are one matmul (flash-linear-attention's chunk form):
    memory O(T·K) per head rather than a [C, C, K] decay tensor per chunk. With r the chunk's
    middle each factor is at most the decay over half a chunk: exact while that stays above
    exp(-80) (float32's range), which `min_log_decay` guarantees for the model's gates.

    With a context this is one span of a split sequence; `state` enters the whole sequence.
    """
    T, C = q.shape[2], chunk_size
    S0 = _initial_state(q, v, state)
    q, k, v, g = (_chunks(x, C) for x in (q, k, v, g))
    q = q * scale
    b = g.cumsum(dim=3)  # log decay from the chunk start to t (inclusive)
    if context is not None:
        S0 = context.prefix_state(_span_summary(k, v, b), decay_fold, S0)
    middle = b[:, :, :, C // 2, None]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = (q * (b - middle).exp()) @ (k * (middle - b).exp()).transpose(-1, -2)
    intra = scores.masked_fill(~causal, 0.0) @ v
    inter, S = _scan_chunks(
        q * b.exp(), k * (b[:, :, :, -1:] - b).exp(), v, b[:, :, :, -1].exp(), S0
    )
    out = (intra + inter).flatten(2, 3)[:, :, :T]
    return out, S


def min_log_decay(chunk_size: int) -> float:
    """The smallest per-token log decay `chunk_gla` folds exactly: half a chunk of it is -80.
    (exp(-80 / 8) = 4.5e-5 per token at chunk 16: the state is forgotten either way.)"""
    return -80.0 / max(1, chunk_size // 2)


def chunk_scalar_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    state: Tensor | None = None,
    chunk_size: int = 64,
    context: ContextParallel | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunkwise form with one gate per head (g: [B, H, T]), as in Mamba2's SSD; a context
    as in `chunk_gla`."""
    B, H, T, K = q.shape
    C = chunk_size
    S0 = _initial_state(q, v, state)
    q, k, v, g = (_chunks(x, C) for x in (q, k, v, g))
    q = q * scale
    b = g.cumsum(dim=3)  # [B, H, N, C]
    if context is not None:
        S0 = context.prefix_state(_span_summary(k, v, b), decay_fold, S0)
    intra = ((q @ k.transpose(-1, -2)) * _pairwise_decay(b)) @ v
    chunk_decay = b[:, :, :, -1, None].exp().expand(B, H, b.shape[2], K)
    inter, S = _scan_chunks(
        q * b[..., None].exp(), k * (b[..., -1:] - b)[..., None].exp(), v, chunk_decay, S0
    )
    out = (intra + inter).flatten(2, 3)[:, :, :T]
    return out, S
