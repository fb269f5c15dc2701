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
