"""The FlexAttention forms (`ltstudy.ops.attention.flex`) against the torch forms: eager forward
on the CPU (flex has no CPU backward), compiled values and gradients on a GPU."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ltstudy.ops.attention import blockwise, flex

# Eager flex (the CPU path) warns that it is unfused; that is the point of running it here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def qkv(t: int, heads: int = 4, kv_heads: int = 2, dim: int = 16, batch: int = 2, **kw):
    g = torch.Generator().manual_seed(0)
    shapes = ((batch, heads, t, dim), (batch, kv_heads, t, dim), (batch, kv_heads, t, dim))
    return [torch.randn(s, generator=g).to(**kw) for s in shapes]


def document_ids(lengths: list[list[int]]) -> torch.Tensor:
    """[B, T] document index of each token, from each row's document lengths."""
    return torch.stack(
        [torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths]
    )


@pytest.mark.parametrize("window", [1, 48, 200])
def test_sliding_window_matches_the_dense_mask_on_the_cpu(window):
    """T = 200 is not a multiple of flex's 128 blocks (window 200 = T: plain causal); 4 query
    heads share 2 kv heads."""
    q, k, v = qkv(200)
    torch.testing.assert_close(
        flex.sliding_window_attention(q, k, v, window),
        blockwise.naive_sliding_window_attention(q, k, v, window),
    )


def per_document(attention, q, k, v, lengths: list[list[int]]) -> torch.Tensor:
    """`attention` run on each document of each row alone, concatenated back."""
    rows = []
    for b, row in enumerate(lengths):
        documents = zip(*(x[b : b + 1].split(row, dim=2) for x in (q, k, v)), strict=True)
        rows.append(torch.cat([attention(*parts) for parts in documents], dim=2))
    return torch.cat(rows)


@pytest.mark.parametrize("window", [48, None])
def test_document_masking_matches_each_document_alone_on_the_cpu(window):
    lengths = [[70, 1, 129], [33, 167]]
    q, k, v = qkv(200)
    expected = per_document(
        lambda q, k, v: blockwise.naive_sliding_window_attention(q, k, v, window or q.shape[2]),
        q,
        k,
        v,
        lengths,
    )
    ids = document_ids(lengths)
    if window is None:
        got = flex.causal_attention(q, k, v, ids)
    else:
        got = flex.sliding_window_attention(q, k, v, window, ids)
    torch.testing.assert_close(got, expected)


def gpu_inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    """q, k, v (8 query heads over 2 kv heads) and an output gradient at T = 4096."""
    q, k, v = qkv(4096, heads=8, dim=64, batch=1, device="cuda", dtype=dtype)
    g = torch.Generator().manual_seed(1)
    return [q, k, v, torch.randn(q.shape, generator=g).to(q)]


def values_and_grads(attention, q, k, v, grad_out) -> list[torch.Tensor]:
    """Output and dq, dk, dv (fp32) of `attention` with a window of 1024."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v, 1024)
    out.backward(grad_out)
    return [x.detach().float() for x in (out, q.grad, k.grad, v.grad)]


NAMES = ("out", "dq", "dk", "dv")


@pytest.mark.gpu
@needs_cuda
def test_flex_sliding_window_matches_blockwise_on_the_gpu_fp32():
    """Both forms compute in fp32 (TF32 is off by default), so they agree to rounding."""
    inputs = gpu_inputs(torch.float32)
    got = values_and_grads(flex.sliding_window_attention, *inputs)
    expected = values_and_grads(blockwise.sliding_window_attention, *inputs)
    for name, a, b in zip(NAMES, got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.gpu
@needs_cuda
def test_flex_sliding_window_matches_blockwise_on_the_gpu_bf16():
    """bf16 rounds scores, probabilities and outputs, so no one fixed bound suits every tensor:
    flex's error against the fp32 result on the same (bf16) inputs must stay within 3x that of
    the blockwise form run in bf16."""
    inputs = gpu_inputs(torch.bfloat16)
    exact = values_and_grads(blockwise.sliding_window_attention, *(x.float() for x in inputs))
    got = values_and_grads(flex.sliding_window_attention, *inputs)
    torch_bf16 = values_and_grads(blockwise.sliding_window_attention, *inputs)
    for name, e, a, b in zip(NAMES, exact, got, torch_bf16, strict=True):
        flex_error, torch_error = (a - e).abs().max().item(), (b - e).abs().max().item()
        assert flex_error <= 3 * torch_error + 1e-5, (name, flex_error, torch_error)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("window", [1024, None])
def test_flex_document_masking_on_the_gpu(window):
    """The compiled block-mask builder and kernel with a per-call document mask."""
    lengths = [[1000, 37, 3059]]
    q, k, v = qkv(4096, heads=8, dim=64, batch=1, device="cuda")
    ids = document_ids(lengths).cuda()
    if window is None:
        got = flex.causal_attention(q, k, v, ids)
        expected = per_document(blockwise.causal_attention, q, k, v, lengths)
    else:
        got = flex.sliding_window_attention(q, k, v, window, ids)
        expected = per_document(
            lambda *x: blockwise.sliding_window_attention(*x, window), q, k, v, lengths
        )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "backends",
    [[SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION], [SDPBackend.FLASH_ATTENTION]],
)
def test_full_attention_runs_a_fused_sdpa_kernel_with_gqa_in_bf16(backends):
    """Full attention is SDPA with enable_gqa; restricted to these backends SDPA raises rather
    than fall back to the math kernel. Flash takes GQA itself (the SDPA docs: GQA works "only for
    Flash_attention and math kernel on CUDA"; in sdp_utils.cpp flash's dense check has
    supports_gqa=true, as cuDNN's has in recent torch), so 16 query heads over 4 kv heads need no
    repeated k/v."""
    q, k, v = qkv(4096, heads=16, kv_heads=4, dim=128, batch=1, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(backends):
        got = blockwise.causal_attention(q, k, v)
    expected = blockwise.naive_sliding_window_attention(q.float(), k.float(), v.float(), 4096)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
