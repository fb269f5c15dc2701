"""Gated delta rule (Gated DeltaNet): the state is corrected toward v_t for key k_t.

    S_t = exp(g_t) (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ        o_t = scale · q_tᵀ S_t

State [batch, heads, K, V]; inputs [batch, heads, time, dim]; g (log decay, <= 0) and β in (0, 1)
are [batch, heads, time]; k is expected L2-normalised. `chunk_gated_delta_rule` is the chunkwise
form: within a chunk the sequence of rank-one corrections collapses into one triangular solve
(the WY / UT representation), and the state passes between chunks; `recurrent_gated_delta_rule`
is the token-by-token reference and decode step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ltstudy.ops.gla import _chunks, _initial_state, _pairwise_decay


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


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    T, C = q.shape[2], chunk_size
    S = _initial_state(q, v, state)
    q, k, v, g, beta = (_chunks(x, C) for x in (q, k, v, g, beta))
    q = q * scale
    b = g.cumsum(dim=3)  # [B, H, N, C] log decay from the chunk start
    gamma = _pairwise_decay(b)
    # T = (I + strictly_lower(diag(β) K Kᵀ ⊙ Γ))⁻¹ turns the chunk's corrections into one solve.
    k_beta = k * beta[..., None]
    strictly = (k_beta @ k.transpose(-1, -2) * gamma).tril(-1)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    T_inv = torch.linalg.solve_triangular(
        eye + strictly, eye.expand_as(strictly), upper=False, unitriangular=True
    )
    u = T_inv @ (v * beta[..., None])  # pseudo-values
    w = T_inv @ (k_beta * b[..., None].exp())  # decayed keys that read the incoming state
    scores = (q @ k.transpose(-1, -2)) * gamma
    k_to_end = k * (b[..., -1:] - b)[..., None].exp()
    outputs = []
    for n in range(q.shape[2]):
        v_new = u[:, :, n] - w[:, :, n] @ S
        outputs.append((q[:, :, n] * b[:, :, n, :, None].exp()) @ S + scores[:, :, n] @ v_new)
        S = b[:, :, n, -1, None, None].exp() * S + k_to_end[:, :, n].transpose(-1, -2) @ v_new
    out = torch.stack(outputs, dim=2).flatten(2, 3)[:, :, :T]
    return out, S
