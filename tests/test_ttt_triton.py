"""In-Place TTT's Triton path against the reference loop, values and gradients, fp32 on the CPU
under Triton's interpreter (conftest sets TRITON_INTERPRET; on a GPU the same tests run the
compiled kernels). The dispatch by `model.kernels` is checked here too."""

from __future__ import annotations

import pytest
import torch

from ltstudy.models.presets import resolve_model
from ltstudy.models.transformer import build_model
from ltstudy.ops.ttt import inplace_ttt, inplace_ttt_reference

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B=2, T=70, D=24, F=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    z, v = torch.randn(B, T, F, generator=g), torch.randn(B, T, D, generator=g)
    w, state = torch.randn(D, F, generator=g), torch.randn(B, D, F, generator=g)
    return [x.to(DEVICE).requires_grad_() for x in (z, v, w, state)]


def test_accumulate_kernel_adds_the_scaled_product_in_place():
    """Strided inputs, sizes no multiple of the tiles, the compute-dtype copy."""
    from ltstudy.ops.ttt.triton import accumulate

    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 40, 2 * 19, generator=g)[:, :37, ::2].to(DEVICE)  # [3, 37, 19], strided
    b = torch.randn(3, 37, 23, generator=g).to(DEVICE)
    w = torch.randn(3, 19, 23, generator=g).to(DEVICE)
    scale = torch.tensor([0.5, -1.0, 2.0], device=DEVICE)
    expected = w + scale[:, None, None] * (a.mT @ b)
    copy = torch.empty_like(w, dtype=torch.float16)
    accumulate(w, copy, a, b, scale)
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(copy, expected.half())


@pytest.mark.parametrize(
    ("clip_tau", "clip_order"), [(None, "before_eta"), (0.5, "before_eta"), (0.5, "after_eta")]
)
@pytest.mark.parametrize("with_state", [False, True])
def test_triton_path_equals_the_reference_loop(clip_tau, clip_order, with_state):
    """70 tokens in chunks of 16: four writes and a trailing partial chunk that only reads;
    clipping active (τ well under the writes' norms), its scale differentiated too."""
    z, v, w, state = _inputs()
    state = state if with_state else None
    settings = dict(eta=0.3, chunk_size=16, clip_tau=clip_tau, clip_order=clip_order, state=state)
    out, final = inplace_ttt(z, v, w, **settings, kernels="triton")
    ref_out, ref_final = inplace_ttt_reference(z, v, w, **settings)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(final, ref_final, rtol=1e-5, atol=1e-4)
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(x.shape, generator=g).to(DEVICE) for x in (out, final)]
    leaves = [x for x in (z, v, w, state) if x is not None]

    def grads(o, s):
        return torch.autograd.grad((o * weights[0]).sum() + (s * weights[1]).sum(), leaves)

    for got, expected in zip(grads(out, final), grads(ref_out, ref_final), strict=True):
        torch.testing.assert_close(
            got, expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item()
        )


def test_ttt_model_on_the_triton_path_matches_the_reference_path():
    """A whole ttt_full model: the kernels setting reaches the TTT MLPs, and the loss and its
    gradients agree with the torch path."""
    settings = {"ttt": {"chunk_size": 16, "every": 1}, "kernels": "triton"}
    cfg = resolve_model("ttt_full", "micro", settings)
    fast = build_model(cfg, seed=0, device=DEVICE)
    slow = build_model({**cfg, "kernels": "reference"}, seed=0, device=DEVICE)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg["vocab_size"], (2, 41), generator=g).to(DEVICE)
    losses = [m.token_losses(ids[:, :-1], ids[:, 1:]).mean() for m in (fast, slow)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for loss in losses:
        loss.backward()
    for a, b in zip(fast.parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_half_precision_inputs_keep_an_fp32_running_weight():
    """fp16 z and v (bf16's dots are wrong in the interpreter): the running weight stays fp32
    and the apply reads its fp16 copy, as bf16 training does on a GPU; within fp16 rounding of
    the fp32 reference."""
    z, v, w, _ = _inputs(T=64)
    settings = dict(eta=0.3, chunk_size=16)
    z, v, w = z.half(), v.half(), w.half()
    out, final = inplace_ttt(z, v, w, **settings, kernels="triton")
    ref_out, ref_final = inplace_ttt_reference(z.float(), v.float(), w.float(), **settings)
    assert out.dtype == torch.float16 and final.dtype == torch.float32
    torch.testing.assert_close(final, ref_final, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(
        out.float(), ref_out, rtol=2e-2, atol=2e-2 * ref_out.abs().max().item()
    )
