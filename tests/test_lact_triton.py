"""LaCT's fused Triton gate kernels (ltstudy/ops/lact/triton.py) against the torch reference
(naive.py), values and gradients, and a whole `lact` call on them against autograd's
`lact_reference`. Compiled on a GPU; on the CPU under Triton's interpreter, in float32 and
float16 (the interpreter's bfloat16 math is wrong)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from ltstudy.ops.backend import interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    # triton picks the interpreter as each kernel is decorated, its own library's (tl.sigmoid)
    # at import: TRITON_INTERPRET must be set before triton is first imported
    if "triton" in sys.modules:
        pytest.skip("triton was imported before TRITON_INTERPRET=1", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from ltstudy.ops.lact import lact, lact_reference, naive  # noqa: E402
from ltstudy.ops.lact import triton as fused  # noqa: E402


def gates(shape, seed, dtype=torch.float32):
    """h1 spread wide (σ saturated in float32 beyond |h1| ~ 17, plus ±60 outright), h3, d_act."""
    g = torch.Generator().manual_seed(seed)
    h1 = 8 * torch.randn(shape, generator=g)
    h1.view(-1)[:4] = torch.tensor([60.0, -60.0, 25.0, -25.0])
    h3, d_act = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return [t.to(DEVICE, dtype).requires_grad_() for t in (h1, h3, d_act)]


def learning_rates(shape, seed):
    """Float32 whatever the gates' dtype, as under autocast."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape[:-1], 3, generator=g).to(DEVICE).requires_grad_()


def values_and_grads(fn, inputs, seed):
    """Outputs, and the gradients of a random weighting of them (in the inputs' dtype)."""
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g).to(DEVICE) for o in outputs]
    loss = sum((o.float() * w).sum() for o, w in zip(outputs, weights, strict=True))
    return outputs, torch.autograd.grad(loss, inputs)


def in_float64(fn):
    """The reference in float64 on the same (rounded) inputs."""
    return lambda *xs: fn(*(x.double() for x in xs))


def assert_close(actual, expected, rtol, atol):
    """Each tensor within rtol of its own largest entry (plus atol), in float64."""
    for a, e in zip(actual, expected, strict=True):
        scale = e.abs().max().item()
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol + rtol * scale)


# shapes not a multiple of the blocks: 1024 elements (apply); 16 rows x 128 units (update,
# F = 200 walks two slices); and a tiny one
SHAPES = [(2, 3, 37, 200), (2, 3, 41, 45), (1, 2, 5, 6)]
LOW_PRECISION = [
    pytest.param(torch.float16, 1e-3, id="float16"),  # rtol: one rounding of the result
    pytest.param(
        torch.bfloat16,
        8e-3,
        id="bfloat16",
        marks=pytest.mark.skipif(DEVICE == "cpu", reason="bfloat16 is wrong in the interpreter"),
    ),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_gate_equals_the_reference(shape):
    inputs = gates(shape, seed=1)[:2]
    out, grads = values_and_grads(fused.swiglu_gate, inputs, seed=2)
    expected, expected_grads = values_and_grads(in_float64(naive.swiglu_gate), inputs, seed=2)
    assert out[0].dtype == torch.float32
    assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert_close(grads, expected_grads, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_update_gates_equal_the_reference(shape):
    """Values, and gradients through silu's second derivative and into the learning rates."""
    inputs = [*gates(shape, seed=3), learning_rates(shape, seed=4)]
    out, grads = values_and_grads(fused.swiglu_update_gates, inputs, seed=5)
    reference = in_float64(naive.swiglu_update_gates)
    expected, expected_grads = values_and_grads(reference, inputs, seed=5)
    assert all(o.dtype == torch.float32 for o in out)
    assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert_close(grads, expected_grads, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype, rtol", LOW_PRECISION)
def test_low_precision_computes_in_float32_and_stores_the_inputs_dtype(dtype, rtol):
    """Within one rounding of the float64 reference; learning-rate gradients in lr's dtype."""
    shape = SHAPES[1]
    inputs = [*gates(shape, seed=6, dtype=dtype), learning_rates(shape, seed=7)]
    out, grads = values_and_grads(fused.swiglu_update_gates, inputs, seed=8)
    reference = in_float64(naive.swiglu_update_gates)
    expected, expected_grads = values_and_grads(reference, inputs, seed=8)
    assert [o.dtype for o in out] == [dtype] * 3
    assert [g.dtype for g in grads] == [dtype] * 3 + [torch.float32]
    assert_close(out, expected, rtol=rtol, atol=0)
    assert_close(grads, expected_grads, rtol=rtol, atol=0)
    out, grads = values_and_grads(fused.swiglu_gate, inputs[:2], seed=9)
    expected, expected_grads = values_and_grads(in_float64(naive.swiglu_gate), inputs[:2], seed=9)
    assert out[0].dtype == dtype
    assert_close(out, expected, rtol=rtol, atol=0)
    assert_close(grads, expected_grads, rtol=rtol, atol=0)


def test_lact_on_the_kernels_equals_autograd(monkeypatch):
    """A whole call (momentum, a partial last chunk) with kernels="triton" against
    `lact_reference`: output, final state, and gradients of every input."""
    calls = []
    for name in ("swiglu_gate", "swiglu_update_gates"):
        original = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *xs, f=original, n=name: calls.append(n) or f(*xs))
    g = torch.Generator().manual_seed(10)
    B, H, T, D, Fh, chunk = 2, 2, 21, 4, 6, 8

    def rand(*shape, normal=True):
        t = torch.randn(shape, generator=g) if normal else torch.rand(shape, generator=g)
        return t.to(DEVICE).requires_grad_()

    q, k, v = rand(B, H, T, D), rand(B, H, T, D), rand(B, H, T, D)
    lr, momentum = rand(B, H, T, 3, normal=False), rand(B, H, T, normal=False)
    weights = (rand(H, Fh, D), rand(H, D, Fh), rand(H, Fh, D))
    inputs = (q, k, v, lr, momentum, *weights)

    def run(op, **kwargs):
        out, state = op(q, k, v, lr, weights, chunk, momentum=momentum, **kwargs)
        return (out, *state.weights, *state.velocity)

    fast, fast_grads = values_and_grads(lambda *_: run(lact, kernels="triton"), inputs, seed=11)
    assert calls.count("swiglu_gate") == 3 and calls.count("swiglu_update_gates") == 2
    slow, slow_grads = values_and_grads(lambda *_: run(lact_reference), inputs, seed=11)
    assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    assert_close(fast_grads, slow_grads, rtol=1e-5, atol=1e-6)
