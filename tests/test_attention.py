"""Blockwise sliding-window attention equals the dense-mask reference, values and gradients."""

import pytest
import torch

from ltstudy.ops.attention import (
    causal_attention,
    naive_sliding_window_attention,
    sliding_window_attention,
    sliding_window_mask,
)


def test_mask_semantics():
    mask = sliding_window_mask(5, 5, window=2)
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("T,window", [(37, 8), (64, 16), (16, 16), (10, 32), (33, 1)])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_blockwise_equals_dense(T, window, heads):
    g = torch.Generator().manual_seed(T * window)
    H, Hkv = heads
    q = torch.randn(2, H, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Hkv, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Hkv, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    fast = sliding_window_attention(q, k, v, window)
    ref = naive_sliding_window_attention(q, k, v, window)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(fast)
    for a, b in zip(
        torch.autograd.grad(fast, (q, k, v), grad),
        torch.autograd.grad(ref, (q, k, v), grad),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_window_covering_everything_is_causal_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 4, generator=g, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(
        naive_sliding_window_attention(q, k, v, 20), causal_attention(q, k, v)
    )


def _trailing_reference(q, k, v, window):
    """Queries at the last t_q of t_k positions against a dense mask."""
    mask = sliding_window_mask(q.shape[2], k.shape[2], window or k.shape[2], q.device)
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("t_q,t_k", [(16, 16), (16, 40), (5, 23)])
def test_trailing_attention_equals_the_dense_mask(window, t_q, t_k):
    """What a context-parallel rank computes: its queries (the last t_q positions) against the
    keys it sees; values and gradients. Also the bottom-right causal mask the CUDA path gives
    SDPA (the CPU path pads the queries instead)."""
    from torch.nn.attention.bias import causal_lower_right

    from ltstudy.ops.attention import trailing_causal_attention, trailing_window_attention

    g = torch.Generator().manual_seed(t_q * t_k)
    q = torch.randn(2, 4, t_q, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, t_k, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, t_k, 8, generator=g, dtype=torch.float64, requires_grad=True)
    fast = (
        trailing_causal_attention(q, k, v)
        if window is None
        else trailing_window_attention(q, k, v, window)
    )
    slow = _trailing_reference(q, k, v, window)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    probe = torch.randn_like(fast)
    for a, b in zip(
        torch.autograd.grad((fast * probe).sum(), (q, k, v)),
        torch.autograd.grad((slow * probe).sum(), (q, k, v)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if window is None:
        bias = causal_lower_right(t_q, t_k)
        cuda_form = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, enable_gqa=True
        )
        torch.testing.assert_close(cuda_form, slow, rtol=1e-10, atol=1e-12)
