"""Whole models on a sequence split over real context-parallel ranks (gloo, float64) give the
single-process hidden states, parameter gradients and per-token losses, for every variant."""

import math

import pytest
import torch

from ltstudy.config import default_settings
from ltstudy.models.presets import resolve_model
from ltstudy.models.transformer import build_model
from ltstudy.models.variants import VARIANTS
from ltstudy.parallel.spans import span_multiple
from tests.context_jobs import assert_same, split_run


def micro_settings() -> dict:
    """The model settings of the micro test study: chunks of 8-16 tokens."""
    settings = default_settings()["model"]
    settings["ttt"] = {**settings["ttt"], "chunk_size": 8, "every": 1}
    settings["mamba2"] = {**settings["mamba2"], "chunk_size": 16}
    return settings


def all_variants(inputs, context):
    """Every variant's micro model on the same ids: hidden states side by side."""
    settings = micro_settings()
    models = torch.nn.ModuleDict(
        {
            v: build_model(resolve_model(v, "micro", settings, context=64), seed=3).double()
            for v in VARIANTS
        }
    )
    states = [m.hidden_states(inputs["ids"], context=context) for m in models.values()]
    return torch.cat(states, dim=-1), models


@pytest.mark.parametrize(("degree", "length"), [(2, 64), (3, 75)])
def test_every_variant_split_over_ranks_equals_one_process(tmp_path, degree, length):
    """Spans of whole 16-token chunks (every micro chunk size divides 16); at degree 3 the last
    span is 11 tokens, a partial chunk."""
    multiple = math.lcm(
        *(span_multiple(resolve_model(v, "micro", micro_settings(), context=64)) for v in VARIANTS)
    )
    assert multiple == 16
    ids = torch.randint(0, 258, (2, length), generator=torch.Generator().manual_seed(0))
    result = split_run(tmp_path, all_variants, {"ids": ids}, degree, multiple)
    assert_same(result, atol=1e-9)
    kinds = set().union(*result["parallel"]["sent"])
    assert kinds == {"all_gather", "halo", "relay"}
