"""In-Place TTT's MLP and LaCT on a sequence split over real context-parallel ranks equal them
on one process: outputs, parameter and input gradients, in float64.

Every case runs in the same job (one per degree): the cases' outputs are concatenated along
the feature dimension and compared one by one. The length (45) leaves the last span with a
partial chunk; the causal target conv (kernel 5) and LaCT's window (8) reach into the
previous span."""

import zlib

import pytest
import torch
from torch import nn

from ltstudy.config import default_settings
from ltstudy.models.config import ModelConfig
from ltstudy.models.presets import resolve_model
from ltstudy.models.rope import Rotary
from ltstudy.models.transformer import build_model
from ltstudy.models.ttt import InPlaceTTTMLP
from ltstudy.parallel.context import ContextParallel
from tests.context_jobs import assert_same, split_run

CHUNK = 8  # the micro preset's LaCT chunk; TTT's is set to match
TTT = {**default_settings()["model"]["ttt"], "chunk_size": CHUNK, "eta": 0.5, "every": 1}
CLIP = {"clip_tau": 5.0, "clip_at": "always"}
TTT_CASES = {
    "ttt-chunk": {"conv_padding": "chunk"},
    "ttt-causal-clip": {"conv_padding": "causal", **CLIP},
    "ttt-causal-mlp_input": {"conv_padding": "causal", "target": "mlp_input"},
    "ttt-chunk-clip-mlp_input": {"conv_padding": "chunk", "target": "mlp_input", **CLIP},
}
LACT_CASES = {
    "lact": {},  # the official defaults: momentum on, Muon off
    "lact-no-momentum": {"use_momentum": False},
    "lact-muon": {"use_muon": True},
}
CASES = [*TTT_CASES, *LACT_CASES]


def _perturb(module: nn.Module, names: tuple[str, ...]) -> None:
    """Move parameters off their initial values (zero conv, identity scales) so they matter."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(s in name for s in names):
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _ttt_mlp(options: dict) -> InPlaceTTTMLP:
    cfg = ModelConfig.from_dict(resolve_model("ttt_full", "micro", {"ttt": {**TTT, **options}}))
    torch.manual_seed(0)
    mlp = InPlaceTTTMLP(cfg.d_model, cfg.d_ff, cfg.ttt).double()
    _perturb(mlp, ("ttt_conv", "ttt_proj"))
    return mlp


def _lact(options: dict) -> nn.Module:
    settings = default_settings()["model"]
    settings["lact"] = {"base_lr": 0.3, **options}  # large steps, so the state matters
    model = build_model(resolve_model("lact", "micro", settings, context=64), seed=3).double()
    layer = model.layers[0].self_attn
    _perturb(layer, ("fast_q_norm", "fast_k_norm", "ttt_scale", "momentum"))
    return layer


def _all_cases(inputs, context):
    """Every case on this rank's span; outputs side by side [B, span, cases * d_model]."""
    x, emb = inputs["x"], inputs["embeddings"]
    ttt = [_ttt_mlp(options) for options in TTT_CASES.values()]
    lact = [_lact(options) for options in LACT_CASES.values()]
    start = 0 if context is None else context.offset
    rope = Rotary(lact[0].head_dim, 10000.0)(start, x.shape[1], x.device)
    outputs = [mlp(x, emb, context=context) for mlp in ttt]
    outputs += [layer(x, rope, context=context) for layer in lact]
    modules = nn.ModuleDict(
        dict(zip([c.replace("-", "_") for c in CASES], ttt + lact, strict=True))
    )
    return torch.cat(outputs, dim=-1), modules


@pytest.fixture(scope="module", params=[2, 3], ids=lambda d: f"degree{d}")
def split(request, tmp_path_factory):
    g = torch.Generator().manual_seed(5)
    inputs = {
        k: torch.randn(2, 45, 32, generator=g, dtype=torch.float64) for k in ("x", "embeddings")
    }
    tmp = tmp_path_factory.mktemp(f"degree{request.param}")
    return split_run(tmp, _all_cases, inputs, degree=request.param, multiple=CHUNK)


@pytest.mark.parametrize("case", CASES)
def test_output_matches_one_process(split, case):
    """Each case's slice of the output, before the gradients of everything are compared."""
    index, width = CASES.index(case), 32
    part = slice(index * width, (index + 1) * width)
    one, many = split["single"]["out"][..., part], split["parallel"]["out"][..., part]
    torch.testing.assert_close(many, one, rtol=0, atol=1e-9)


def test_gradients_match_one_process(split):
    assert split["spans"][-1] % CHUNK  # the last span ends in a partial chunk
    assert_same(split, atol=1e-9)
    sent = split["parallel"]["sent"]
    assert "relay" in sent[0] and "halo" in sent[0] and "all_gather" in sent[0]


def test_document_resets_with_a_context_are_refused():
    """Resetting at document starts is not built for split sequences: say so, naming the
    field, rather than carry fast weights across a document start."""
    context = ContextParallel(None, 0, (CHUNK, CHUNK))  # refused before any exchange
    x = torch.randn(1, CHUNK, 32, dtype=torch.float64)
    mlp = _ttt_mlp({"reset_at_documents": True, "document_separator": 1})
    starts = torch.zeros(1, CHUNK, dtype=torch.bool)
    for cache in (None, {}):
        with pytest.raises(NotImplementedError, match=r"ttt\.reset_at_documents"):
            mlp(x, x, cache, starts, context=context)
