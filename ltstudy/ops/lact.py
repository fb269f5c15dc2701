"""Large-chunk test-time training (LaCT; Zhang et al., 2025) with SwiGLU fast weights.

Per head the fast weight is a SwiGLU f_W(x) = W2 (silu(W1 x) ⊙ (W3 x)). The sequence is cut into
large chunks; each chunk first *applies* the current weights to its queries, then *updates* them
with one gradient step on L = -Σ_i η_i <f_W(k_i), v_i> (per-token learning rates η for each of
W1, W2, W3), after which every row of every matrix is rescaled to the norm it had initially.

Shapes: q, k, v [B, H, T, D]; lr [B, H, T, 3]; weights (W1 [.., F, D], W2 [.., D, F],
W3 [.., F, D]) per head ([H, ...]) or per sequence ([B, H, ...]). `lact` uses hand-derived
gradients; `lact_reference` gets them from autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Weights = tuple[Tensor, Tensor, Tensor]


def swiglu_apply(weights: Weights, x: Tensor) -> Tensor:
    w1, w2, w3 = weights
    return (F.silu(x @ w1.transpose(-1, -2)) * (x @ w3.transpose(-1, -2))) @ w2.transpose(-1, -2)


def _renormalize(weights: Weights, norms: Weights) -> Weights:
    return tuple(
        w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12) * n
        for w, n in zip(weights, norms, strict=True)
    )


def row_norms(weights: Weights) -> Weights:
    return tuple(w.norm(dim=-1, keepdim=True) for w in weights)


def _per_sequence(weights: Weights, batch: int) -> Weights:
    return tuple(w.expand(batch, *w.shape) if w.dim() == 3 else w for w in weights)


def lact_step(weights: Weights, norms: Weights, k: Tensor, v: Tensor, lr: Tensor) -> Weights:
    """One update with the analytic gradient of -Σ η <f_W(k), v>."""
    w1, w2, w3 = weights
    h1, h3 = k @ w1.transpose(-1, -2), k @ w3.transpose(-1, -2)
    sig = torch.sigmoid(h1)
    act = h1 * sig
    d_w2 = torch.einsum("bhc,bhcd,bhcf->bhdf", lr[..., 1], v, act * h3)
    d_act = v @ w2  # [B, H, C, F]
    g1 = d_act * h3 * sig * (1 + h1 * (1 - sig))
    g3 = d_act * act
    d_w1 = torch.einsum("bhc,bhcf,bhcd->bhfd", lr[..., 0], g1, k)
    d_w3 = torch.einsum("bhc,bhcf,bhcd->bhfd", lr[..., 2], g3, k)
    return _renormalize((w1 + d_w1, w2 + d_w2, w3 + d_w3), norms)


def _reference_step(weights: Weights, norms: Weights, k: Tensor, v: Tensor, lr: Tensor) -> Weights:
    with torch.enable_grad():
        ws = tuple(w if w.requires_grad else w.detach().requires_grad_() for w in weights)
        out = swiglu_apply(ws, k)  # [B, H, C, D]
        per_token = (out * v).sum(-1)  # <f_W(k_i), v_i>
        grads = []
        for index, w in enumerate(ws):
            loss = -(lr[..., index] * per_token).sum()  # each matrix has its own rates
            grads.append(torch.autograd.grad(loss, w, create_graph=True)[0])
    return _renormalize(tuple(w - g for w, g in zip(ws, grads, strict=True)), norms)


def _run(
    step, q, k, v, lr, weights: Weights, chunk_size: int, state: Weights | None
) -> tuple[Tensor, Weights]:
    norms = row_norms(weights)
    current = _per_sequence(weights, q.shape[0]) if state is None else state
    outputs = []
    for start in range(0, q.shape[2], chunk_size):
        part = slice(start, start + chunk_size)
        outputs.append(swiglu_apply(current, q[:, :, part]))
        if q[:, :, part].shape[2] == chunk_size:
            current = step(current, norms, k[:, :, part], v[:, :, part], lr[:, :, part])
    return torch.cat(outputs, dim=2), current


def lact(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    weights: Weights,
    chunk_size: int,
    state: Weights | None = None,
) -> tuple[Tensor, Weights]:
    """Apply-then-update over chunks; returns (output, weights after the last complete chunk)."""
    return _run(lact_step, q, k, v, lr, weights, chunk_size, state)


def lact_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    weights: Weights,
    chunk_size: int,
    state: Weights | None = None,
) -> tuple[Tensor, Weights]:
    return _run(_reference_step, q, k, v, lr, weights, chunk_size, state)
