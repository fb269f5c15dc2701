"""In-Place TTT fast-weight ops (arXiv 2604.06169, Algorithm 1).

The MLP's down projection W_down is a fast weight. The sequence is cut into chunks of C tokens;
each chunk is first *applied* with the current weight, then the weight is *updated* with that
chunk's write ΔW_i = V̂_iᵀ Z_i (the gradient of -<Z W_downᵀ, V̂>):

    O_i = Z_i W^(i)ᵀ,    W^(i+1) = W^(i) + η ΔW_i

`inplace_ttt` computes all chunks at once with an exclusive prefix sum over ΔW;
`inplace_ttt_reference` is the sequential apply-then-update loop it must equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _chunked(x: Tensor, chunk_size: int) -> Tensor:
    """[B, T, D] -> [B, N, C, D], zero-padding T up to a multiple of C."""
    B, T, D = x.shape
    pad = -T % chunk_size
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.view(B, -1, chunk_size, D)


def clip_update(delta: Tensor, eta: float, tau: float | None, order: str) -> Tensor:
    """η·ΔW with the update's Frobenius norm capped at τ (per sequence and chunk).

    `order` says whether τ bounds ΔW before the η scaling or η·ΔW after it.
    """
    if tau is None:
        return eta * delta
    scaled = eta * delta if order == "after_eta" else delta
    norm = torch.linalg.matrix_norm(scaled.float(), ord="fro").to(delta.dtype)
    factor = torch.clamp(tau / norm.clamp_min(torch.finfo(norm.dtype).tiny), max=1.0)
    scaled = scaled * factor[..., None, None]
    return scaled if order == "after_eta" else eta * scaled


def inplace_ttt(
    z: Tensor,
    v: Tensor,
    w_down: Tensor,
    *,
    eta: float,
    chunk_size: int,
    clip_tau: float | None = None,
    clip_order: str = "after_eta",
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fast-weight MLP output for z: [B, T, F] (gated activations), v: [B, T, D] (targets).

    w_down: [D, F] is the slow initial weight; `state` [B, D, F] is what earlier chunks already
    added to it (decoding). Returns (output [B, T, D], state after the last complete chunk; a
    trailing partial chunk's write waits until the chunk is complete). The slow part is a plain
    F.linear and the fast part is added on top, so with v == 0 the output is bit-identical to
    the backbone MLP.
    """
    T = z.shape[1]
    zc, vc = _chunked(z, chunk_size), _chunked(v, chunk_size)
    delta = torch.einsum("bncd,bncf->bndf", vc, zc)  # ΔW_i per chunk: [B, N, D, F]
    step = clip_update(delta, eta, clip_tau, clip_order)
    before = torch.cumsum(step, dim=1) - step  # exclusive prefix sum: Σ_{j<i} η ΔW_j
    if state is not None:
        before = before + state[:, None]
    fast = torch.einsum("bncf,bndf->bncd", zc, before).flatten(1, 2)[:, :T]
    complete = step[:, : T // chunk_size].sum(dim=1)
    final = complete if state is None else state + complete
    return F.linear(z, w_down) + fast, final


def inplace_ttt_reference(
    z: Tensor,
    v: Tensor,
    w_down: Tensor,
    *,
    eta: float,
    chunk_size: int,
    clip_tau: float | None = None,
    clip_order: str = "after_eta",
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
