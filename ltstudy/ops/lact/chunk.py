"""Large-chunk test-time training (LaCT; Zhang et al., 2025) with SwiGLU fast weights.

Per head the fast weight is a SwiGLU f_W(x) = W2 (silu(W1 x) ⊙ (W3 x)). The sequence is cut into
large chunks; each chunk first *applies* the current weights to its queries, then *updates* them
with one step on L = -Σ_i η_i <f_W(k_i), v_i> (per-token learning rates η for each of W1, W2,
W3), after which every row of every matrix is rescaled to the norm it had initially. As in the
official `block_causal_lact_swiglu` (a1600012888/LaCT, lact_llm), the step Δ = -∇L may carry
momentum (Δ += m·Δ_prev, m the chunk's mean per-token momentum, the buffer kept before Muon) and
may be orthogonalised by Newton-Schulz (Muon) before it is added.

Shapes: q, k, v [B, H, T, D]; lr [B, H, T, 3]; momentum [B, H, T]; weights (W1 [.., F, D],
W2 [.., D, F], W3 [.., F, D]) per head ([H, ...]) or per sequence ([B, H, ...]). `lact` uses
hand-derived gradients; `lact_reference` gets them from autograd. Both run in the inputs' dtype
(the official code runs Newton-Schulz in bfloat16). The elementwise gate math of the apply and
the update runs in torch (`naive.py`) or, on the fast path (`kernels`, see ltstudy.ops.backend),
in fused Triton kernels (`triton.py`); `lact_reference` is always torch.
"""

from __future__ import annotations

from functools import partial
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from ltstudy.ops import backend
from ltstudy.ops.lact import naive

Weights = tuple[Tensor, Tensor, Tensor]

# The official LM code's quintic Newton-Schulz schedule (lact_llm/ttt_operation.py), one
# (a, b, c) per iteration; Muon's original constant one is 5 x (3.4445, -4.7750, 2.0315).
NS_COEFFICIENTS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)


class LaCTState(NamedTuple):
    """Fast weights of each sequence, and the last step (momentum buffer) when momentum is on."""

    weights: Weights
    velocity: Weights | None


def newton_schulz(g: Tensor, coefficients=NS_COEFFICIENTS) -> Tensor:
    """Push the singular values of each matrix in g toward 1 (keeping its singular vectors), as
    Muon does: scale to Frobenius norm 1, then X <- aX + (bA + cA²)X with A = XXᵀ."""
    tall = g.shape[-2] > g.shape[-1]
    x = g.mT if tall else g
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in coefficients:
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return x.mT if tall else x


def _gate_math(kernels: str, x: Tensor) -> ModuleType:
    """The module whose `swiglu_gate` and `swiglu_update_gates` run for tensors like `x`."""
    if backend.use_fast(kernels, x):
        from ltstudy.ops.lact import triton as fused

        return fused
    return naive


def swiglu_apply(weights: Weights, x: Tensor, kernels: str = "reference") -> Tensor:
    w1, w2, w3 = weights
    h1, h3 = x @ w1.transpose(-1, -2), x @ w3.transpose(-1, -2)
    return _gate_math(kernels, x).swiglu_gate(h1, h3) @ w2.transpose(-1, -2)


def row_norms(weights: Weights) -> Weights:
    return tuple(w.norm(dim=-1, keepdim=True) for w in weights)


def _advance(
    state: LaCTState, norms: Weights, deltas: Weights, momentum: Tensor | None, use_muon: bool
) -> LaCTState:
    """Momentum, Muon, add, then rescale every row to its initial norm (official order)."""
    velocity = None
    if momentum is not None:
        m = momentum.mean(dim=-1)[..., None, None]  # one rate per sequence and head
        deltas = velocity = tuple(d + m * p for d, p in zip(deltas, state.velocity, strict=True))
    if use_muon:
        deltas = tuple(newton_schulz(d) for d in deltas)
    weights = []
    for w, d, n in zip(state.weights, deltas, norms, strict=True):
        w = w + d
        weights.append(w / (w.norm(dim=-1, keepdim=True) + 1e-5) * n)
    return LaCTState(tuple(weights), velocity)


def lact_step(
    state: LaCTState,
    norms: Weights,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    momentum: Tensor | None = None,
    use_muon: bool = False,
    kernels: str = "reference",
) -> LaCTState:
    """One update with the analytic gradient of -Σ η <f_W(k), v>."""
    w1, w2, w3 = state.weights
    h1, h3 = k @ w1.transpose(-1, -2), k @ w3.transpose(-1, -2)
    d_act = v @ w2  # [B, H, C, F]
    a, g1, g3 = _gate_math(kernels, k).swiglu_update_gates(h1, h3, d_act, lr)  # g1, g3 η-scaled
    d_w1 = g1.transpose(-1, -2) @ k
    d_w2 = torch.einsum("bhc,bhcd,bhcf->bhdf", lr[..., 1], v, a)
    d_w3 = g3.transpose(-1, -2) @ k
    return _advance(state, norms, (d_w1, d_w2, d_w3), momentum, use_muon)


def _reference_step(
    state: LaCTState,
    norms: Weights,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    momentum: Tensor | None = None,
    use_muon: bool = False,
) -> LaCTState:
    with torch.enable_grad():
        ws = tuple(w if w.requires_grad else w.detach().requires_grad_() for w in state.weights)
        per_token = (swiglu_apply(ws, k) * v).sum(-1)  # <f_W(k_i), v_i>
        deltas = []
        for index, w in enumerate(ws):
            loss = -(lr[..., index] * per_token).sum()  # each matrix has its own rates
            deltas.append(-torch.autograd.grad(loss, w, create_graph=True)[0])
    return _advance(LaCTState(ws, state.velocity), norms, tuple(deltas), momentum, use_muon)


def initial_state(weights: Weights, batch: int, momentum: bool) -> LaCTState:
    """Each sequence starts from the learned weights (and a zero momentum buffer)."""
    per_sequence = tuple(w.expand(batch, *w.shape) if w.dim() == 3 else w for w in weights)
    velocity = tuple(torch.zeros_like(w) for w in per_sequence) if momentum else None
    return LaCTState(per_sequence, velocity)


def _run(
    step,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    weights: Weights,
    chunk_size: int,
    state: LaCTState | None,
    momentum: Tensor | None,
    use_muon: bool,
    kernels: str,
) -> tuple[Tensor, LaCTState]:
    norms = row_norms(weights)
    current = initial_state(weights, q.shape[0], momentum is not None) if state is None else state
    outputs = []
    for start in range(0, q.shape[2], chunk_size):
        part = slice(start, start + chunk_size)
        outputs.append(swiglu_apply(current.weights, q[:, :, part], kernels))
        if q[:, :, part].shape[2] == chunk_size:
            m = None if momentum is None else momentum[:, :, part]
            current = step(
                current, norms, k[:, :, part], v[:, :, part], lr[:, :, part], m, use_muon
            )
    return torch.cat(outputs, dim=2), current


def lact(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    weights: Weights,
    chunk_size: int,
    state: LaCTState | None = None,
    momentum: Tensor | None = None,
    use_muon: bool = False,
    kernels: str = "reference",
) -> tuple[Tensor, LaCTState]:
    """Apply-then-update over chunks; returns (output, state after the last complete chunk).

    `weights` are the learned initial fast weights (their row norms are kept); `state`, if
    given, is where a previous call stopped."""
    step = partial(lact_step, kernels=kernels)
    return _run(step, q, k, v, lr, weights, chunk_size, state, momentum, use_muon, kernels)


def lact_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    weights: Weights,
    chunk_size: int,
    state: LaCTState | None = None,
    momentum: Tensor | None = None,
    use_muon: bool = False,
) -> tuple[Tensor, LaCTState]:
    return _run(
        _reference_step, q, k, v, lr, weights, chunk_size, state, momentum, use_muon, "reference"
    )
