"""Gated delta rule (Gated DeltaNet): the state is corrected toward v_t for key k_t.

    S_t = exp(g_t) (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ        o_t = scale · q_tᵀ S_t

State [batch, heads, K, V]; inputs [batch, heads, time, dim]; g (log decay, <= 0) and β in (0, 1)
are [batch, heads, time]; k is expected L2-normalised. `chunk_gated_delta_rule` is the chunkwise
form: within a chunk the sequence of rank-one corrections collapses into one triangular solve
(the WY / UT representation), and the state passes between chunks; `recurrent_gated_delta_rule`
is the token-by-token reference and decode step.

Each chunk maps the state affinely, S -> (exp(b_last) I - k_to_endᵀ w) S + k_to_endᵀ u, so a
span does too: a [K, K] transition and a bias (`gated_delta_rule_span_summary`, `matrix_fold`).
With a `ContextParallel` the chunk form starts from the state folded from the earlier spans'
summaries (fla's `ops/cp` for Gated DeltaNet).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ltstudy.ops.gla.chunk import _chunks, _initial_state, _pairwise_decay

if TYPE_CHECKING:
    from ltstudy.parallel.context import ContextParallel


def recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    S = _initial_state(q, v, state)
    outputs = []
    for t in range(q.shape[2]):
        S = g[:, :, t, None, None].exp() * S
        k_t = k[:, :, t]
        error = v[:, :, t] - torch.einsum("bhk,bhkv->bhv", k_t, S)
        S = S + beta[:, :, t, None, None] * k_t[..., None] * error[..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t] * scale, S))
    return torch.stack(outputs, dim=2), S


def _wy_form(
    k: Tensor, v: Tensor, g: Tensor, beta: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Chunked keys k, log decays b from the chunk start, pairwise decays gamma, pseudo-values
    u, decayed keys w that read the incoming state, and keys decayed to the chunk end."""
    C = chunk_size
    k, v, g, beta = (_chunks(x, C) for x in (k, v, g, beta))
    b = g.cumsum(dim=3)  # [B, H, N, C] log decay from the chunk start
    gamma = _pairwise_decay(b)
    # T = (I + strictly_lower(diag(β) K Kᵀ ⊙ Γ))⁻¹ turns the chunk's corrections into one solve.
    k_beta = k * beta[..., None]
    strictly = (k_beta @ k.transpose(-1, -2) * gamma).tril(-1)
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    T_inv = torch.linalg.solve_triangular(
        eye + strictly, eye.expand_as(strictly), upper=False, unitriangular=True
    )
    u = T_inv @ (v * beta[..., None])  # pseudo-values
    w = T_inv @ (k_beta * b[..., None].exp())  # decayed keys that read the incoming state
    k_to_end = k * (b[..., -1:] - b)[..., None].exp()
    return k, b, gamma, u, w, k_to_end


def _chunk_step(
    S: Tensor, n: int, b: Tensor, u: Tensor, w: Tensor, k_to_end: Tensor
) -> tuple[Tensor, Tensor]:
    """Chunk n's corrected values and the state after it."""
    v_new = u[:, :, n] - w[:, :, n] @ S
    S = b[:, :, n, -1, None, None].exp() * S + k_to_end[:, :, n].transpose(-1, -2) @ v_new
    return v_new, S


def _span_summary(b: Tensor, u: Tensor, w: Tensor, k_to_end: Tensor) -> tuple[Tensor, Tensor]:
    """The chunk steps run on [I | 0] with pseudo-values [0 | u]: the first K columns end as
    the span's transition, the last V as its final state from a zero entry state."""
    B, H, N, C, K = w.shape
    V = u.shape[-1]
    eye = torch.eye(K, dtype=w.dtype, device=w.device).expand(B, H, K, K)
    S = torch.cat([eye, w.new_zeros(B, H, K, V)], dim=-1)
    u = torch.cat([u.new_zeros(B, H, N, C, K), u], dim=-1)
    for n in range(N):
        _, S = _chunk_step(S, n, b, u, w, k_to_end)
    transition, bias = S.split([K, V], dim=-1)
    return transition, bias


def matrix_fold(state: Tensor, summary: tuple[Tensor, ...]) -> Tensor:
    """A span's map on the state entering it: transition [B,H,K,K] @ state + bias."""
    transition, bias = summary
    return transition @ state + bias


def gated_delta_rule_span_summary(
    k: Tensor, v: Tensor, g: Tensor, beta: Tensor, chunk_size: int = 64
) -> tuple[Tensor, Tensor]:
    """(transition [B,H,K,K], bias [B,H,K,V]) of a span: it maps its entry state S to
    `matrix_fold(S, (transition, bias))`, bias being the final state from a zero entry state."""
    _, b, _, u, w, k_to_end = _wy_form(k, v, g, beta, chunk_size)
    return _span_summary(b, u, w, k_to_end)


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    state: Tensor | None = None,
    chunk_size: int = 64,
    context: ContextParallel | None = None,
) -> tuple[Tensor, Tensor]:
    """With a context this is one span of a split sequence; `state` enters the whole sequence."""
    T = q.shape[2]
    S = _initial_state(q, v, state)
    q = _chunks(q, chunk_size) * scale
    k, b, gamma, u, w, k_to_end = _wy_form(k, v, g, beta, chunk_size)
    if context is not None:
        S = context.prefix_state(_span_summary(b, u, w, k_to_end), matrix_fold, S)
    scores = (q @ k.transpose(-1, -2)) * gamma
    outputs = []
    for n in range(q.shape[2]):
        v_new, S_next = _chunk_step(S, n, b, u, w, k_to_end)
        outputs.append((q[:, :, n] * b[:, :, n, :, None].exp()) @ S + scores[:, :, n] @ v_new)
        S = S_next
    out = torch.stack(outputs, dim=2).flatten(2, 3)[:, :, :T]
    return out, S
