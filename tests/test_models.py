"""Model zoo basics: meta-device parameter counts of the presets, the chunked loss, init."""

import pytest
import torch
import torch.nn.functional as F

from ltstudy.cli import main
from ltstudy.config import default_settings
from ltstudy.models.presets import resolve_model
from ltstudy.models.transformer import build_model, count_parameters
from ltstudy.models.variants import VARIANTS


@pytest.mark.parametrize("size, expected", [("4B", 4.02e9), ("8B", 8.03e9), ("14B", 14.77e9)])
def test_full_presets_match_their_reference_models(size, expected):
    count = count_parameters(resolve_model("full", size, {}))["total"]
    assert abs(count - expected) / expected < 0.01


PAPER_SIZES = ["500M", "1.5B", "4B", "8B", "14B"]


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_every_variant_is_within_five_percent_of_full(size):
    settings = default_settings()["model"]
    full = count_parameters(resolve_model("full", size, settings, context=32768))["total"]
    for variant in VARIANTS:
        count = count_parameters(resolve_model(variant, size, settings, context=32768))["total"]
        assert abs(count / full - 1) < 0.05, (variant, size, count, full)


def test_sizes_command_prints_every_variant_at_every_size(capsys):
    assert main(["sizes", "--context", "65536"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "@64k" in lines[0]
    rows = {(line.split()[0], line.split()[1]) for line in lines[1:]}
    assert rows == {(size, variant) for size in PAPER_SIZES for variant in VARIANTS}


def test_chunked_loss_equals_plain_cross_entropy():
    cfg = resolve_model("swa", "micro", {})
    model = build_model(cfg, seed=0).double()
    ids = torch.randint(0, cfg["vocab_size"], (2, 50), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, dims=1)
    labels[0, :7] = -100
    chunked = model.token_losses(ids, labels, chunk=16)
    logits = model(ids)
    plain = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    torch.testing.assert_close(chunked, plain)
    g_chunked = torch.autograd.grad(chunked.sum(), list(model.parameters()))
    g_plain = torch.autograd.grad(plain.sum(), list(model.parameters()))
    for a, b in zip(g_chunked, g_plain, strict=True):
        torch.testing.assert_close(a, b)


def test_init_depends_only_on_seed_and_name():
    a = build_model(resolve_model("full", "micro", {}), seed=5).state_dict()
    b = build_model(resolve_model("full", "micro", {}), seed=5).state_dict()
    c = build_model(resolve_model("full", "micro", {}), seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a["layers.0.self_attn.q_proj.weight"], c["layers.0.self_attn.q_proj.weight"]
    )
