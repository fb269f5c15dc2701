"""In-Place TTT's fast weights on the GPU: the chunk loop of `chunk.py` with each write fused.

Per chunk the torch form casts the running [D, F] sum to the compute dtype, materialises the
write V̂ᵀZ, clips it, adds it and allocates the new sum: about 20 bytes of memory traffic per
weight element against the 2·C FLOPs per element of the chunk's two matmuls, so at C = 1024 it
is as slow as the matmuls. Here one Triton kernel (`accumulate`) adds s·AᵀB to the fp32 running
sum in place, tile by tile with tensor cores, and writes the compute-dtype copy the next chunk's
apply reads (cuBLAS): 12 bytes per element per chunk, nothing allocated. Only one [B, D, F] sum
exists (plus its copy); the backward recomputes it.

Clipping needs each write's Frobenius norm before the write is added. It is taken from the
chunk's Gram matrices, ‖VᵀZ‖² = Σ (V Vᵀ) ⊙ (Z Zᵀ) (C² (D + F) FLOPs instead of C·D·F), as a
per-chunk scale s_i that autograd differentiates like any torch expression: the kernel's
backward returns the gradient of each s_i, <H_i, V_iᵀZ_i>.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ltstudy.ops.backend import compute_dtype, interpreting


@triton.jit
def _accumulate_kernel(
    w_ptr,
    copy_ptr,
    a_ptr,
    b_ptr,
    scale_ptr,
    C,
    D,
    F,
    stride_ab,
    stride_at,
    stride_ad,
    stride_bb,
    stride_bt,
    stride_bf,
    WRITE_COPY: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """W[b, d-tile, f-tile] += scale[b] · A[b]ᵀ B[b] for A [C, D], B [C, F]; W contiguous fp32."""
    pid_d, pid_f, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    a_base = a_ptr + b * stride_ab + offs_d[:, None] * stride_ad
    b_base = b_ptr + b * stride_bb + offs_f[None, :] * stride_bf
    acc = tl.zeros((BLOCK_D, BLOCK_F), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        a = tl.load(
            a_base + offs_c[None, :] * stride_at,
            mask=(offs_d[:, None] < D) & (offs_c[None, :] < C),
            other=0.0,
        )
        bt = tl.load(
            b_base + offs_c[:, None] * stride_bt,
            mask=(offs_c[:, None] < C) & (offs_f[None, :] < F),
            other=0.0,
        )
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    tile = b * D * F + offs_d[:, None] * F + offs_f[None, :]
    inside = (offs_d[:, None] < D) & (offs_f[None, :] < F)
    w = tl.load(w_ptr + tile, mask=inside, other=0.0) + tl.load(scale_ptr + b) * acc
    tl.store(w_ptr + tile, w, mask=inside)
    if WRITE_COPY:
        tl.store(copy_ptr + tile, w.to(copy_ptr.dtype.element_ty), mask=inside)


def accumulate(w: Tensor, copy: Tensor | None, a: Tensor, b: Tensor, scale: Tensor) -> None:
    """In place: w [B, D, F] (contiguous fp32) += scale[:, None, None] · aᵀ b for a [B, C, D]
    and b [B, C, F] (any strides, one dtype); `copy`, if given, receives w in its dtype."""
    B, C, D = a.shape
    F = b.shape[2]
    small = interpreting()  # the interpreter runs each program in numpy: few, small tiles
    block_d, block_f, block_c = (16, 16, 16) if small else (128, 128, 32)
    grid = (triton.cdiv(D, block_d), triton.cdiv(F, block_f), B)
    _accumulate_kernel[grid](
        w,
        w if copy is None else copy,
        a,
        b,
        scale,
        C,
        D,
        F,
        *a.stride(),
        *b.stride(),
        WRITE_COPY=copy is not None,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_D=block_d,
        BLOCK_F=block_f,
        BLOCK_C=block_c,
        num_warps=4 if small else 8,
    )


class _Sum:
    """A running fp32 sum [B, D, F] and the copy in the compute dtype that matmuls read."""

    def __init__(self, start: Tensor, dtype: torch.dtype):
        self.fp32 = start.float().contiguous().clone()
        self.copy = None if dtype == torch.float32 else self.fp32.to(dtype)

    @property
    def readable(self) -> Tensor:
        return self.fp32 if self.copy is None else self.copy

    def add(self, a: Tensor, b: Tensor, scale: Tensor) -> None:
        accumulate(self.fp32, self.copy, a, b, scale.contiguous())


class _FastWeights(torch.autograd.Function):
    """Z_i W_iᵀ per chunk with W_{i+1} = W_i + s_i V_iᵀ Z_i; returns (output, final fp32 sum).
    Saves z, v, the scales and the start; the backward runs the chunks forward (each chunk's
    read, dZ_i = dO_i W_i) and then backward (what later chunks did with each write: H_i, the
    gradient of W_{i+1}, gives dZ_i += s_i V_i H_i, dV_i = s_i Z_i H_iᵀ, ds_i = <H_i, V_iᵀZ_i>)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, z, v, scales, start, chunk_size):
        running = _Sum(start, z.dtype)
        out = torch.empty(*z.shape[:2], v.shape[2], dtype=z.dtype, device=z.device)
        for i, begin in enumerate(range(0, z.shape[1], chunk_size)):
            zi, vi = z[:, begin : begin + chunk_size], v[:, begin : begin + chunk_size]
            out[:, begin : begin + chunk_size] = torch.bmm(zi, running.readable.mT)
            if zi.shape[1] == chunk_size:
                running.add(vi, zi, scales[:, i])
        ctx.save_for_backward(z, v, scales, start)
        ctx.chunk_size = chunk_size
        return out, running.fp32

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out, grad_final):
        z, v, scales, start = ctx.saved_tensors
        C = ctx.chunk_size
        begins = list(range(0, z.shape[1], C))
        grad_out = grad_out.to(z.dtype)
        grad_z, grad_v = torch.empty_like(z), torch.zeros_like(v)
        running = _Sum(start, z.dtype)
        for i, begin in enumerate(begins):
            zi, vi = z[:, begin : begin + C], v[:, begin : begin + C]
            grad_z[:, begin : begin + C] = torch.bmm(
                grad_out[:, begin : begin + C], running.readable
            )
            if zi.shape[1] == C:
                running.add(vi, zi, scales[:, i])
        del running
        later = _Sum(torch.zeros_like(start) if grad_final is None else grad_final, z.dtype)
        grad_scales = torch.zeros_like(scales)
        ones = torch.ones(z.shape[0], device=z.device)
        for i, begin in reversed(list(enumerate(begins))):
            zi, vi = z[:, begin : begin + C], v[:, begin : begin + C]
            if zi.shape[1] == C:
                pulled = torch.bmm(vi, later.readable)  # V_i H_i [B, C, F]
                if ctx.needs_input_grad[2]:  # clipping in training: the scales depend on z, v
                    grad_scales[:, i] = (pulled.float() * zi.float()).sum(dim=(1, 2))
                grad_z[:, begin : begin + C] += scales[:, i, None, None].to(z.dtype) * pulled
                grad_v[:, begin : begin + C] = torch.bmm(zi, later.readable.mT) * scales[
                    :, i, None, None
                ].to(v.dtype)
            later.add(grad_out[:, begin : begin + C], zi, ones)
        return grad_z, grad_v, grad_scales, later.fp32, None


def clip_scales(
    z: Tensor, v: Tensor, eta: float, chunk_size: int, tau: float | None, order: str
) -> Tensor:
    """s_i [B, complete chunks] with s_i V_iᵀZ_i = clip_update(V_iᵀZ_i, eta, tau, order)."""
    B, T, _ = z.shape
    n = T // chunk_size
    if tau is None or n == 0:
        return torch.full((B, n), eta, device=z.device, dtype=torch.float32)
    zc = z[:, : n * chunk_size].float().unflatten(1, (n, chunk_size))
    vc = v[:, : n * chunk_size].float().unflatten(1, (n, chunk_size))
    squared = ((vc @ vc.mT) * (zc @ zc.mT)).sum(dim=(-2, -1))
    norm = squared.clamp_min(0).sqrt() * (eta if order == "after_eta" else 1.0)
    return eta * torch.clamp(tau / norm.clamp_min(torch.finfo(norm.dtype).tiny), max=1.0)


def fast_weights(
    z: Tensor,
    v: Tensor,
    state: Tensor | None,
    eta: float,
    chunk_size: int,
    clip_tau: float | None,
    clip_order: str,
) -> tuple[Tensor, Tensor]:
    """The fast part of the output [B, T, D] and the state after the last complete chunk (fp32,
    or the dtype of `state`), as `chunk.fast_weights`."""
    dtype = compute_dtype(z, v)  # one dtype for the dots: autocast does not cast our inputs
    z, v = z.to(dtype), v.to(dtype)
    scales = clip_scales(z, v, eta, chunk_size, clip_tau, clip_order)
    start = z.new_zeros(z.shape[0], v.shape[2], z.shape[2], dtype=torch.float32)
    if state is not None:
        start = start + state
    out, final = _FastWeights.apply(z, v, scales, start, chunk_size)
    return out, final if state is None else final.to(state.dtype)
