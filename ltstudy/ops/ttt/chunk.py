"""In-Place TTT's fast weights in torch, chunk by chunk (the CPU path; see `naive.py` for
the equations).

`fast_weights` runs the chunks in order keeping one [D, F] running sum per sequence, and its
backward recomputes the writes chunk by chunk instead of storing the [N, D, F] prefix sums
(16 bytes per token per TTT layer instead of 4·D·F/C).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ltstudy.ops.ttt.naive import clip_update


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


def fast_weights(
    z: Tensor,
    v: Tensor,
    state: Tensor | None,
    eta: float,
    chunk_size: int,
    clip_tau: float | None,
    clip_order: str,
) -> tuple[Tensor, Tensor]:
    """The fast part of the output [B, T, D] and the state after the last complete chunk."""
    return _FastWeights.apply(z, v, state, eta, chunk_size, clip_tau, clip_order)
