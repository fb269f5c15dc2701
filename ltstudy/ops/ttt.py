"""In-Place TTT fast-weight ops (arXiv 2604.06169, Algorithm 1).

The MLP's down projection W_down is a fast weight. The sequence is cut into chunks of C tokens;
each chunk is first *applied* with the current weight, then the weight is *updated* with that
chunk's write ΔW_i = V̂_iᵀ Z_i (the gradient of -<Z W_downᵀ, V̂>):

    O_i = Z_i W^(i)ᵀ,    W^(i+1) = W^(i) + η ΔW_i

`inplace_ttt` runs the chunks in order keeping one [D, F] running sum per sequence, and its
backward recomputes the writes chunk by chunk instead of storing the [N, D, F] prefix sums
(16 bytes per token per TTT layer instead of 4·D·F/C); `inplace_ttt_reference` is the plain
sequential apply-then-update loop, differentiated by autograd, that it must equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_update(delta: Tensor, eta: float, tau: float | None, order: str) -> Tensor:
    """η·ΔW with the update's Frobenius norm capped at τ (per sequence and chunk).

    `order` says whether τ bounds ΔW before the η scaling (the paper's rule, so the write is at
    most η·τ) or η·ΔW after it.
    """
    if tau is None:
        return eta * delta
    scaled = eta * delta if order == "after_eta" else delta
    norm = torch.linalg.matrix_norm(scaled.float(), ord="fro").to(delta.dtype)
    factor = torch.clamp(tau / norm.clamp_min(torch.finfo(norm.dtype).tiny), max=1.0)
    scaled = scaled * factor[..., None, None]
    return scaled if order == "after_eta" else eta * scaled


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    """Running sums are kept in at least float32 (bf16 inputs under autocast)."""
    return torch.promote_types(x.dtype, torch.float32)


def _write(z: Tensor, v: Tensor, eta: float, tau: float | None, order: str) -> Tensor:
    """One complete chunk's update η·V̂ᵀZ (clipped), [B, D, F], in at least float32."""
    delta = torch.einsum("btd,btf->bdf", v, z)
    return clip_update(delta.to(_accumulation_dtype(delta)), eta, tau, order)


class _FastWeights(torch.autograd.Function):
    """The fast part of the output, Z_i (Σ_{j<i} η ΔW_j + state)ᵀ per chunk, and the state after
    the last complete chunk. Saves only z, v and the initial state; the backward makes two
    passes over the chunks (forward order for what each chunk read, reverse order for what
    later chunks did with each write), recomputing each write from z and v."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, z, v, state, eta, chunk_size, tau, order):
        B, T, F_ = z.shape
        running = z.new_zeros(B, v.shape[-1], F_, dtype=_accumulation_dtype(z))
        if state is not None:
            running = running + state
        outputs = []
        for start in range(0, T, chunk_size):
            zi, vi = z[:, start : start + chunk_size], v[:, start : start + chunk_size]
            outputs.append(torch.einsum("btf,bdf->btd", zi, running.to(zi.dtype)))
            if zi.shape[1] == chunk_size:
                running = running + _write(zi, vi, eta, tau, order)
        ctx.save_for_backward(z, v, state)
        ctx.settings = (eta, chunk_size, tau, order)
        final = running if state is None else running.to(state.dtype)  # >= float32
        return torch.cat(outputs, dim=1), final

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out, grad_final):
        z, v, state = ctx.saved_tensors
        eta, C, tau, order = ctx.settings
        T = z.shape[1]
        starts = list(range(0, T, C))
        grad_z = torch.zeros_like(z)
        grad_v = torch.zeros_like(v)
        # 1. What each chunk read: dZ_i += dO_i W^(i), W^(i) the running sum before chunk i.
        running = z.new_zeros(z.shape[0], v.shape[-1], z.shape[-1], dtype=_accumulation_dtype(z))
        if state is not None:
            running = running + state
        for start in starts:
            end = start + C
            zi, vi = z[:, start:end], v[:, start:end]
            grad_z[:, start:end] = torch.einsum(
                "btd,bdf->btf", grad_out[:, start:end], running.to(z.dtype)
            )
            if zi.shape[1] == C:
                running = running + _write(zi, vi, eta, tau, order)
        # 2. What later chunks did with each write: G_i = dFinal + Σ_{j>i} dO_jᵀ Z_j, pulled
        #    back through the (clipped) write of chunk i by autograd, one chunk at a time.
        later = torch.zeros_like(running)
        if grad_final is not None:
            later = later + grad_final
        for start in reversed(starts):
            end = start + C
            zi, vi = z[:, start:end], v[:, start:end]
            if zi.shape[1] == C:
                with torch.enable_grad():
                    zi_, vi_ = zi.detach().requires_grad_(), vi.detach().requires_grad_()
                    dz, dv = torch.autograd.grad(
                        _write(zi_, vi_, eta, tau, order), (zi_, vi_), later
                    )
                grad_z[:, start:end] += dz
                grad_v[:, start:end] += dv
            later = later + torch.einsum("btd,btf->bdf", grad_out[:, start:end], zi)
        grad_state = later.to(state.dtype) if state is not None else None
        return grad_z, grad_v, grad_state, None, None, None, None


def inplace_ttt(
    z: Tensor,
    v: Tensor,
    w_down: Tensor,
    *,
    eta: float,
    chunk_size: int,
    clip_tau: float | None = None,
    clip_order: str = "before_eta",
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fast-weight MLP output for z: [B, T, F] (gated activations), v: [B, T, D] (targets).

    w_down: [D, F] is the slow initial weight; `state` [B, D, F] is what earlier chunks already
    added to it (decoding). Returns (output [B, T, D], state after the last complete chunk; a
    trailing partial chunk's write waits until the chunk is complete). The slow part is a plain
    F.linear and the fast part is added on top, so with v == 0 the output is bit-identical to
    the backbone MLP.
    """
    fast, final = _FastWeights.apply(z, v, state, eta, chunk_size, clip_tau, clip_order)
    return F.linear(z, w_down) + fast, final


def inplace_ttt_reference(
    z: Tensor,
    v: Tensor,
    w_down: Tensor,
    *,
    eta: float,
    chunk_size: int,
    clip_tau: float | None = None,
    clip_order: str = "before_eta",
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sequential apply-then-update over chunks, one weight matrix per sequence."""
    B, T, _ = z.shape
    added = z.new_zeros(B, *w_down.shape) if state is None else state
    outputs = []
    for start in range(0, T, chunk_size):
        zi, vi = z[:, start : start + chunk_size], v[:, start : start + chunk_size]
        outputs.append(torch.einsum("btf,bdf->btd", zi, w_down + added))
        if zi.shape[1] == chunk_size:
            delta = torch.einsum("btd,btf->bdf", vi, zi)
            added = added + clip_update(delta, eta, clip_tau, clip_order)
    return torch.cat(outputs, dim=1), added
