"""Context parallelism for the linear-recurrent mixers (gla, deltanet, mamba2): a span's summary
maps any entry state as the token recurrence does, and the mixers split over real ranks (gloo)
give one process's outputs and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltstudy.config import default_settings
from ltstudy.models.config import ModelConfig
from ltstudy.models.presets import SIZES, resolve_model
from ltstudy.models.transformer import mixer_class
from ltstudy.ops.delta_rule.chunk import (
    gated_delta_rule_span_summary,
    matrix_fold,
    recurrent_gated_delta_rule,
)
from ltstudy.ops.gla.chunk import decay_fold, gla_span_summary, recurrent_gla
from tests.context_jobs import assert_same, split_run

LINEAR = ("gla", "deltanet", "mamba2")
D_MODEL = SIZES["micro"]["d_model"]


def rand(*shape, seed, low=None, high=None):
    g = torch.Generator().manual_seed(seed)
    if low is None:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
    x = low + (high - low) * torch.rand(*shape, generator=g, dtype=torch.float64)
    return x.requires_grad_()


def span_case(kind):
    """Inputs of one span (37 tokens: a partial last chunk), the recurrent reference's final
    state from a random entry state, and the summary folded onto that state."""
    B, H, T, K, V = 2, 3, 37, 4, 5
    q, v, s0 = rand(B, H, T, K, seed=1), rand(B, H, T, V, seed=2), rand(B, H, K, V, seed=3)
    if kind == "gla":
        k, g = rand(B, H, T, K, seed=4), rand(B, H, T, K, seed=5, low=-3.0, high=0.0)
        inputs = (k, v, g, s0)
        reference = recurrent_gla(q, k, v, g, 1.0, s0)[1]
        folded = decay_fold(s0, gla_span_summary(k, v, g, chunk_size=8))
    elif kind == "scalar_gla":
        k, g = rand(B, H, T, K, seed=6), rand(B, H, T, seed=7, low=-3.0, high=0.0)
        inputs = (k, v, g, s0)
        reference = recurrent_gla(q, k, v, g, 1.0, s0)[1]
        folded = decay_fold(s0, gla_span_summary(k, v, g, chunk_size=16))
    else:
        k = rand(B, H, T, K, seed=8)
        g, beta = rand(B, H, T, seed=9, low=-2.0, high=0.0), rand(B, H, T, seed=10, low=0, high=1)
        inputs = (k, v, g, beta, s0)
        k_unit = F.normalize(k, dim=-1)
        reference = recurrent_gated_delta_rule(q, k_unit, v, g, beta, 1.0, s0)[1]
        summary = gated_delta_rule_span_summary(k_unit, v, g, beta, chunk_size=8)
        folded = matrix_fold(s0, summary)
    return inputs, reference, folded


@pytest.mark.parametrize("kind", ["gla", "scalar_gla", "delta_rule"])
def test_span_summary_maps_any_entry_state_as_the_recurrence(kind):
    inputs, reference, folded = span_case(kind)
    torch.testing.assert_close(folded, reference, rtol=1e-10, atol=1e-10)
    probe = torch.randn(
        reference.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    want = torch.autograd.grad((reference * probe).sum(), inputs, retain_graph=True)
    got = torch.autograd.grad((folded * probe).sum(), inputs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def linear_mixers():
    """The three mixers at `micro` size in float64, every parameter random (none zero, so
    each path, conv biases included, shows in the gradients)."""
    settings = default_settings()["model"]
    mixers = nn.ModuleDict()
    for variant in LINEAR:
        cfg = ModelConfig.from_dict(resolve_model(variant, "micro", settings, context=256))
        mixers[variant] = mixer_class(variant)(cfg, 0)
    mixers = mixers.double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mixers.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return mixers


def run_linear_mixers(inputs, context):
    mixers = linear_mixers()
    out = [mixer(inputs["x"], None, context=context) for mixer in mixers.values()]
    return torch.cat(out, dim=-1), mixers


def chunk_multiple():
    """Spans must be whole chunks for every mixer: the largest chunk size (the others divide it)."""
    sizes = [mixer.chunk_size for mixer in linear_mixers().values()]
    assert all(max(sizes) % s == 0 for s in sizes)
    return max(sizes)


@pytest.mark.parametrize("degree, tail", [(2, 37), (3, 2)])
def test_linear_mixers_split_over_ranks_equal_one_process(tmp_path, degree, tail):
    """Degree 2: spans of several chunks, the last ending in a partial chunk; degree 3: a
    2-token last span (shorter than the convs' halo). Only summaries and halos cross ranks."""
    multiple = chunk_multiple()
    x = torch.randn(2, 2 * multiple + tail, D_MODEL, generator=torch.Generator().manual_seed(tail))
    result = split_run(tmp_path, run_linear_mixers, {"x": x.double()}, degree, multiple)
    assert result["spans"][-1] == tail  # a partial chunk for every mixer
    assert all(tail % mixer.chunk_size for mixer in linear_mixers().values())
    assert_same(result, atol=1e-9)
    assert all(set(sent) == {"all_gather", "halo"} for sent in result["parallel"]["sent"])
