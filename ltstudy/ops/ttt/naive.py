"""In-Place TTT's reference: the sequential apply-then-update loop of arXiv 2604.06169,
Algorithm 1, differentiated by autograd. Every faster form must equal it.

The MLP's down projection W_down is a fast weight. The sequence is cut into chunks of C tokens;
each chunk is first *applied* with the current weight, then the weight is *updated* with that
chunk's write ΔW_i = V̂_iᵀ Z_i (the gradient of -<Z W_downᵀ, V̂>):

    O_i = Z_i W^(i)ᵀ,    W^(i+1) = W^(i) + η ΔW_i
"""

from __future__ import annotations

import torch
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
