"""Checks that need CUDA (run by scripts/gpu_check.sh on a GPU machine; skipped elsewhere)."""

import pytest
import torch

from ltstudy.config import default_settings
from ltstudy.models.presets import resolve_model
from ltstudy.models.transformer import build_model
from ltstudy.models.variants import VARIANTS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_training_step_and_cached_decoding_on_the_gpu(variant):
    settings = default_settings()["model"]
    settings["ttt"].update(chunk_size=64, every=2)
    model = build_model(
        resolve_model(variant, "demo", settings, context=512), seed=0, device="cuda"
    )
    ids = torch.randint(0, 258, (2, 300), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.token_losses(ids[:, :-1], ids[:, 1:]).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(
        p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters()
    )
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :200], cache)] + [
            model(ids[:, t : t + 1], cache) for t in range(200, 300)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=2e-3, atol=2e-3)


def test_trailing_causal_attention_on_the_gpu():
    """The context-parallel full-attention kernel (bottom-right causal mask on SDPA's CUDA
    kernels) against the CPU form, bf16 inputs."""
    from ltstudy.ops.attention import trailing_causal_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, t, 64, generator=g) for h, t in ((8, 256), (2, 1024), (2, 1024)))
    expected = trailing_causal_attention(q, k, v)
    got = trailing_causal_attention(*(x.cuda().bfloat16() for x in (q, k, v)))
    torch.testing.assert_close(got.float().cpu(), expected, rtol=0.02, atol=0.02)
