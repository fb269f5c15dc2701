"""`model.kernels` and the dispatch: which path each op takes on which device.

The fast paths themselves are tested against their references in test_ttt_triton.py,
test_lact_triton.py, test_fla.py and test_flex_attention.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ltstudy.config import default_settings
from ltstudy.models.presets import resolve_model
from ltstudy.models.transformer import build_model
from ltstudy.models.variants import VARIANTS
from ltstudy.ops import backend
from ltstudy.ops.attention import attention, blockwise


def test_kernels_setting_picks_the_path(monkeypatch):
    x = torch.zeros(1)
    assert not backend.use_fast("reference", x)
    assert backend.use_fast("auto", x) == x.is_cuda
    with pytest.raises(ValueError, match="kernels"):
        backend.use_fast("fast", x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not x.is_cuda:
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            backend.use_fast("triton", x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's default path")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_auto_runs_the_torch_forms_on_the_cpu(variant, monkeypatch):
    """The default (`auto`) never reaches a fast path on the CPU: the demo's numbers are the
    torch forms' whatever is installed."""
    asked = []

    def spy(kernels, x):
        asked.append(real(kernels, x))
        return asked[-1]

    real = backend.use_fast
    monkeypatch.setattr(backend, "use_fast", spy)
    settings = default_settings()["model"]
    settings["ttt"].update(chunk_size=8)
    cfg = resolve_model(variant, "micro", settings)
    assert cfg["kernels"] == "auto"
    model = build_model(cfg, seed=0, device="cpu")
    ids = torch.randint(0, cfg["vocab_size"], (1, 33))
    model.token_losses(ids[:, :-1], ids[:, 1:]).mean().backward()
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :20], cache)
        model(ids[:, 20:21], cache)
    assert not any(asked)
    if variant != "full":  # full attention is SDPA on every path: it asks nothing
        assert asked


def test_sliding_window_dispatch(monkeypatch):
    """FlexAttention on a GPU under the fast path; on the CPU (no flex backward) the blockwise
    form, the same numbers as the reference setting."""
    g = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g).to(device) for _ in range(3))
    if device == "cuda":
        from ltstudy.ops.attention import flex

        calls = []
        monkeypatch.setattr(
            flex,
            "sliding_window_attention",
            lambda *a: calls.append(a) or blockwise.causal_attention(*a[:3]),
        )
        attention(q, k, v, 8, "triton")
        assert calls
    else:
        torch.testing.assert_close(
            attention(q, k, v, 8, "triton"),
            blockwise.sliding_window_attention(q, k, v, 8),
            rtol=0,
            atol=0,
        )
    assert torch.equal(attention(q, k, v, 64, "triton"), blockwise.causal_attention(q, k, v))


@pytest.mark.skipif(not backend.has_module("triton"), reason="needs triton")
def test_our_triton_kernels_compile_for_hopper_in_bf16():
    """The interpreter runs the kernels' Python, not Triton's compiler: here each kernel is
    compiled for sm_90 (H100/H200) with bf16 pointers, down to a cubin by the ptxas that ships
    with Triton, so what only a GPU build would reject (types, dot shapes) fails here too."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("hopper_build.py")
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    built = dict(line.split() for line in done.stdout.splitlines())
    assert len(built) == 5 and all(int(size) > 0 for size in built.values())
