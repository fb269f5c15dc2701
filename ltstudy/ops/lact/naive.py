"""The SwiGLU fast weight's elementwise gate math in plain torch: the reference the Triton
kernels (`triton.py`) are tested against, and what runs off the fast path.

With h1 = x W1ᵀ, h3 = x W3ᵀ, the fast weight's hidden units are silu(h1) ⊙ h3. The update of
a chunk (keys k, values v) needs, besides those units a, the gradients of Σ <f_W(k), v> with
respect to h1 and h3 given d_act = v W2 (σ = sigmoid(h1)):

    g1 = d_act ⊙ h3 ⊙ σ (1 + h1 (1 - σ))      (silu'(h1) = σ (1 + h1 (1 - σ)))
    g3 = d_act ⊙ silu(h1)

each scaled by its token's learning rate (η [.., C, 3]: index 0 for W1, 2 for W3; W2's, index 1,
scales v in the update's matmul, where it was before the kernels, so the torch path's rounding
is unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def swiglu_gate(h1: Tensor, h3: Tensor) -> Tensor:
    """silu(h1) ⊙ h3: the hidden units a query reads out through W2."""
    return F.silu(h1) * h3


def swiglu_update_gates(
    h1: Tensor, h3: Tensor, d_act: Tensor, lr: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(a, η₀ g1, η₂ g3), all [.., C, F]: the factors of the update's ΔW2 = (η₁ v)ᵀ a,
    ΔW1 = (η₀ g1)ᵀ k and ΔW3 = (η₂ g3)ᵀ k."""
    sig = torch.sigmoid(h1)
    act = h1 * sig
    a = act * h3
    g1 = d_act * h3 * sig * (1 + h1 * (1 - sig))
    g3 = d_act * act
    lr = lr.to(h1.dtype)[..., None]  # outputs in the gates' dtype, as the kernels store them
    return a, lr[..., 0, :] * g1, lr[..., 2, :] * g3
