"""The SwiGLU fast weight's gate math (`naive.py`) as fused Triton kernels, forward and backward.

Each chunk's apply and update are matmuls around elementwise work over [B, H, C, F] tensors
(C up to 2048 tokens): in torch that work is a dozen kernels, each reading and writing whole
tensors, and autograd keeps their intermediates (σ, silu, products) for the backward pass.
Here each direction is one pass: the forward reads h1, h3 (and d_act, the learning rates) once
and writes each output once; the backward saves only the inputs and recomputes σ from h1.
The learning rates of W1 and W3 are folded into the update's outputs, so the products that
follow are plain matmuls (W2's scales v, as on the torch path). Math runs in float32 whatever
the storage dtype (bfloat16 in training); results are stored in the inputs' dtype,
learning-rate gradients in lr's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # elements per program of the apply kernels
TILE = 2048  # elements per program of the update kernels: BLOCK_R rows x BLOCK_F units
MAX_BLOCK_F = 128  # wider hidden sizes are walked in slices of this many units


@triton.jit
def _silu_parts(h1):
    """σ(h1), silu(h1) and silu'(h1) = σ (1 + h1 (1 - σ))."""
    sig = tl.sigmoid(h1)
    return sig, h1 * sig, sig * (1 + h1 * (1 - sig))


@triton.jit
def _gate_fwd(h1_ptr, h3_ptr, a_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h1 = tl.load(h1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h3 = tl.load(h3_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = h1 * tl.sigmoid(h1) * h3
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd(h1_ptr, h3_ptr, da_ptr, dh1_ptr, dh3_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h1 = tl.load(h1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h3 = tl.load(h3_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _, silu, dsilu = _silu_parts(h1)
    tl.store(dh1_ptr + offs, (da * h3 * dsilu).to(dh1_ptr.dtype.element_ty), mask=mask)
    tl.store(dh3_ptr + offs, (da * silu).to(dh3_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_fwd(
    h1_ptr,
    h3_ptr,
    d_ptr,
    lr_ptr,
    a_ptr,
    g1_ptr,
    g3_ptr,
    rows,
    F,
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """A tile of BLOCK_R tokens (rows of F hidden units, lr rows of 3), walked along F."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < rows
    lr0 = tl.load(lr_ptr + 3 * r, mask=r_mask, other=0.0).to(tl.float32)[:, None]
    lr2 = tl.load(lr_ptr + 3 * r + 2, mask=r_mask, other=0.0).to(tl.float32)[:, None]
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        offs = r[:, None] * F + f[None, :]
        mask = r_mask[:, None] & (f < F)[None, :]
        h1 = tl.load(h1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h3 = tl.load(h3_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _, silu, dsilu = _silu_parts(h1)
        tl.store(a_ptr + offs, (silu * h3).to(a_ptr.dtype.element_ty), mask=mask)
        tl.store(g1_ptr + offs, (lr0 * d * h3 * dsilu).to(g1_ptr.dtype.element_ty), mask=mask)
        tl.store(g3_ptr + offs, (lr2 * d * silu).to(g3_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_bwd(
    h1_ptr,
    h3_ptr,
    d_ptr,
    lr_ptr,
    da_ptr,
    dg1_ptr,
    dg3_ptr,
    dh1_ptr,
    dh3_ptr,
    dd_ptr,
    dlr_ptr,
    rows,
    F,
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Gradients through (silu·h3, η₀ d·h3·silu', η₂ d·silu); silu'' enters through g1.
    Each token's learning-rate gradients are sums over F, accumulated across the walk."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < rows
    lr0 = tl.load(lr_ptr + 3 * r, mask=r_mask, other=0.0).to(tl.float32)[:, None]
    lr2 = tl.load(lr_ptr + 3 * r + 2, mask=r_mask, other=0.0).to(tl.float32)[:, None]
    dlr0 = tl.zeros([BLOCK_R], dtype=tl.float32)
    dlr2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        offs = r[:, None] * F + f[None, :]
        mask = r_mask[:, None] & (f < F)[None, :]
        h1 = tl.load(h1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h3 = tl.load(h3_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dg1 = tl.load(dg1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dg3 = tl.load(dg3_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig, silu, dsilu = _silu_parts(h1)
        d2silu = sig * (1 - sig) * (2 + h1 * (1 - 2 * sig))
        u1, u3 = lr0 * dg1, lr2 * dg3  # upstream gradients of the unscaled g1, g3
        dh1 = dsilu * (da * h3 + u3 * d) + u1 * d * h3 * d2silu
        dh3 = da * silu + u1 * d * dsilu
        dd = u1 * h3 * dsilu + u3 * silu
        tl.store(dh1_ptr + offs, dh1.to(dh1_ptr.dtype.element_ty), mask=mask)
        tl.store(dh3_ptr + offs, dh3.to(dh3_ptr.dtype.element_ty), mask=mask)
        tl.store(dd_ptr + offs, dd.to(dd_ptr.dtype.element_ty), mask=mask)
        dlr0 += tl.sum(dg1 * d * h3 * dsilu, axis=1)
        dlr2 += tl.sum(dg3 * d * silu, axis=1)
    tl.store(dlr_ptr + 3 * r, dlr0.to(dlr_ptr.dtype.element_ty), mask=r_mask)
    tl.store(
        dlr_ptr + 3 * r + 1,
        tl.zeros([BLOCK_R], dtype=tl.float32).to(dlr_ptr.dtype.element_ty),
        mask=r_mask,
    )
    tl.store(dlr_ptr + 3 * r + 2, dlr2.to(dlr_ptr.dtype.element_ty), mask=r_mask)


def _check(gates: tuple[Tensor, ...]) -> None:
    if any(g.shape != gates[0].shape or g.dtype != gates[0].dtype for g in gates):
        raise ValueError("the gate inputs must share one shape and dtype (no broadcasting)")


def _update_grid(rows: int, F: int) -> tuple[tuple[int], int, int]:
    block_f = min(triton.next_power_of_2(F), MAX_BLOCK_F)
    block_r = TILE // block_f
    return (triton.cdiv(rows, block_r),), block_r, block_f


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h1: Tensor, h3: Tensor) -> Tensor:
        h1, h3 = h1.contiguous(), h3.contiguous()
        a = torch.empty_like(h1)
        n = h1.numel()
        _gate_fwd[(triton.cdiv(n, BLOCK),)](h1, h3, a, n, BLOCK=BLOCK)
        ctx.save_for_backward(h1, h3)
        return a

    @staticmethod
    def backward(ctx, da: Tensor) -> tuple[Tensor, Tensor]:
        h1, h3 = ctx.saved_tensors
        dh1, dh3 = torch.empty_like(h1), torch.empty_like(h3)
        n = h1.numel()
        _gate_bwd[(triton.cdiv(n, BLOCK),)](h1, h3, da.contiguous(), dh1, dh3, n, BLOCK=BLOCK)
        return dh1, dh3


class _UpdateGates(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, h1: Tensor, h3: Tensor, d_act: Tensor, lr: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        h1, h3, d_act, lr = h1.contiguous(), h3.contiguous(), d_act.contiguous(), lr.contiguous()
        a, g1, g3 = (torch.empty_like(h1) for _ in range(3))
        F = h1.shape[-1]
        rows = h1.numel() // F
        grid, block_r, block_f = _update_grid(rows, F)
        _update_fwd[grid](h1, h3, d_act, lr, a, g1, g3, rows, F, BLOCK_R=block_r, BLOCK_F=block_f)
        ctx.save_for_backward(h1, h3, d_act, lr)
        return a, g1, g3

    @staticmethod
    def backward(
        ctx, da: Tensor, dg1: Tensor, dg3: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        h1, h3, d_act, lr = ctx.saved_tensors
        dh1, dh3, dd = (torch.empty_like(h1) for _ in range(3))
        dlr = torch.empty_like(lr)
        F = h1.shape[-1]
        rows = h1.numel() // F
        grid, block_r, block_f = _update_grid(rows, F)
        _update_bwd[grid](
            h1, h3, d_act, lr, da.contiguous(), dg1.contiguous(), dg3.contiguous(),
            dh1, dh3, dd, dlr, rows, F, BLOCK_R=block_r, BLOCK_F=block_f,
        )  # fmt: skip
        return dh1, dh3, dd, dlr


def swiglu_gate(h1: Tensor, h3: Tensor) -> Tensor:
    """silu(h1) ⊙ h3 (naive.swiglu_gate) in one fused pass each way."""
    _check((h1, h3))
    return _Gate.apply(h1, h3)


def swiglu_update_gates(
    h1: Tensor, h3: Tensor, d_act: Tensor, lr: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(a, η₀ g1, η₂ g3) (naive.swiglu_update_gates) in one fused pass each way."""
    _check((h1, h3, d_act))
    if lr.shape != (*h1.shape[:-1], 3):
        raise ValueError(f"lr is {tuple(lr.shape)}; expected {(*h1.shape[:-1], 3)}")
    return _UpdateGates.apply(h1, h3, d_act, lr)
