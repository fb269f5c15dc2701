"""A context-parallel prefill with a decode cache, then greedy decoding, gives every rank the
single process's logits for every variant, in float64. Full attention's keys and values stay
spread over the ranks (decoding merges their partial softmaxes); every other state is the last
rank's.

The prompt's last span ends mid-chunk, so TTT and LaCT hold a pending chunk after the
prefill, and decoding runs long enough to complete it and read the write. At degree 3 the last
span is one token: no chunk of its own completes (TTT's conv history comes from the previous
span) and the one-token prefill takes the chunk path. Parameters that start at zero (TTT's
target conv, biases) are moved (tests.context_jobs.greedy_logits), so every cached state
shows in the logits."""

import pytest
import torch

from ltstudy.models.presets import resolve_model
from ltstudy.parallel.spans import span_multiple, split_spans
from tests.context_jobs import split_generate
from tests.test_context_model import micro_settings

# multi-process runs (submitit ranks, killed and resumed jobs): `make test-slow`, in CI
pytestmark = pytest.mark.slow

# degree: (prompt length, decode steps); spans of whole chunks of 8 or 16 tokens.
SHAPES = {2: (45, 5), 3: (33, 8)}  # last spans 21 or 13 tokens; 1 token
VARIANTS = {
    "full": ("full", {}),
    "swa": ("swa", {}),
    "hybrid": ("hybrid", {}),
    "gla": ("gla", {}),
    "deltanet": ("deltanet", {}),
    "mamba2": ("mamba2", {}),
    "lact": ("lact", {}),
    "ttt_full": ("ttt_full", {}),
    "ttt_swa": ("ttt_swa", {}),
    "ttt_full-causal-clip": ("ttt_full", {"conv_padding": "causal", "clip_tau": 0.5}),
}


def model_cfg(variant: str, ttt_options: dict) -> dict:
    settings = micro_settings()
    settings["ttt"] = {**settings["ttt"], **ttt_options}
    settings["lact"] = {**settings["lact"], "base_lr": 0.3}  # large steps: the state matters
    return resolve_model(variant, "micro", settings, context=64)


@pytest.mark.parametrize("degree", [2, 3])
def test_split_prefill_then_decoding_gives_the_single_process_logits(tmp_path, degree):
    length, steps = SHAPES[degree]
    cases, spans_of = [], []
    for variant, ttt_options in VARIANTS.values():
        cfg = model_cfg(variant, ttt_options)
        g = torch.Generator().manual_seed(1)
        cases.append((cfg, torch.randint(0, cfg["vocab_size"], (2, length), generator=g), steps))
        spans_of.append(split_spans(length, degree, span_multiple(cfg)))
        assert span_multiple(cfg) == 1 or spans_of[-1][-1] % span_multiple(cfg)  # mid-chunk
        if cfg.get("ttt") or variant == "lact":  # and the pending chunk completes in decoding
            chunk = cfg["ttt"]["chunk_size"] if cfg.get("ttt") else cfg["mixer"]["chunk_size"]
            assert spans_of[-1][-1] % chunk + steps > chunk
    multiples = [span_multiple(cfg) for cfg, _, _ in cases]
    results = split_generate(tmp_path, cases, degree, multiples)
    for name, (ranks, single) in zip(VARIANTS, results, strict=True):
        for rank, logits in enumerate(ranks):
            torch.testing.assert_close(logits, single, rtol=0, atol=1e-9, msg=f"{name} rank {rank}")
