"""Every mixer: chunkwise form = recurrent form (values and gradients, float64), decoding token
by token through the cache = one full forward pass, and analytic parameter counts = modules."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ltstudy.config import default_settings
from ltstudy.models.config import ModelConfig
from ltstudy.models.mixer_sizes import mixer_parameters
from ltstudy.models.presets import SIZES, resolve_model
from ltstudy.models.transformer import build_model, mixer_class
from ltstudy.models.variants import VARIANTS
from ltstudy.ops.delta_rule.chunk import chunk_gated_delta_rule, recurrent_gated_delta_rule
from ltstudy.ops.gla.chunk import chunk_gla, chunk_scalar_gla, min_log_decay, recurrent_gla
from ltstudy.ops.lact import lact, lact_reference


def rand(*shape, seed, low=None, high=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if low is not None:
        x = low + (high - low) * torch.rand(*shape, generator=g, dtype=torch.float64)
    return x.requires_grad_()


def assert_same(fast, slow, inputs):
    (o1, s1), (o2, s2) = fast, slow
    torch.testing.assert_close(o1, o2, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(s1, s2, rtol=1e-9, atol=1e-10)
    go, gs = torch.randn_like(o1), torch.randn_like(s1)
    g1 = torch.autograd.grad((o1 * go).sum() + (s1 * gs).sum(), inputs, materialize_grads=True)
    g2 = torch.autograd.grad((o2 * go).sum() + (s2 * gs).sum(), inputs, materialize_grads=True)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_gla_chunkwise_in_float32_at_the_strongest_decay_it_folds():
    """Every gate at the floor: the folded factors reach exp(±80) within a chunk, near the edge
    of float32's range; the chunk form stays finite and equals the float64 recurrence."""
    B, H, T, K, V = 1, 2, 48, 4, 3
    q, k, v = rand(B, H, T, K, seed=1), rand(B, H, T, K, seed=2), rand(B, H, T, V, seed=3)
    g = torch.full((B, H, T, K), min_log_decay(16), dtype=torch.float64)
    s0 = rand(B, H, K, V, seed=5)
    expected, _ = recurrent_gla(q, k, v, g, 0.5, s0)
    got, state = chunk_gla(*(x.float() for x in (q, k, v, g)), 0.5, s0.float(), 16)
    assert torch.isfinite(got).all() and torch.isfinite(state).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T, chunk", [(37, 8), (32, 16), (5, 16)])
def test_gla_chunkwise_equals_recurrent(T, chunk):
    B, H, K, V = 2, 3, 4, 5
    q, k, v = rand(B, H, T, K, seed=1), rand(B, H, T, K, seed=2), rand(B, H, T, V, seed=3)
    g = rand(B, H, T, K, seed=4, low=-3.0, high=0.0)  # strong decays: exercise stability
    s0 = rand(B, H, K, V, seed=5)
    inputs = (q, k, v, g, s0)
    assert_same(chunk_gla(q, k, v, g, 0.5, s0, chunk), recurrent_gla(q, k, v, g, 0.5, s0), inputs)


@pytest.mark.parametrize("T, chunk", [(37, 8), (64, 64), (3, 16)])
def test_scalar_gate_chunkwise_equals_recurrent(T, chunk):
    B, H, K, V = 2, 3, 4, 5
    q, k, v = rand(B, H, T, K, seed=6), rand(B, H, T, K, seed=7), rand(B, H, T, V, seed=8)
    g = rand(B, H, T, seed=9, low=-8.0, high=0.0)
    s0 = rand(B, H, K, V, seed=10)
    inputs = (q, k, v, g, s0)
    assert_same(
        chunk_scalar_gla(q, k, v, g, 1.0, s0, chunk), recurrent_gla(q, k, v, g, 1.0, s0), inputs
    )


@pytest.mark.parametrize("T, chunk", [(37, 8), (32, 16), (6, 16)])
def test_gated_delta_rule_chunkwise_equals_recurrent(T, chunk):
    B, H, K, V = 2, 3, 4, 5
    q = rand(B, H, T, K, seed=11)
    k = F.normalize(rand(B, H, T, K, seed=12), dim=-1)
    v = rand(B, H, T, V, seed=13)
    g = rand(B, H, T, seed=14, low=-2.0, high=0.0)
    beta = rand(B, H, T, seed=15, low=0.0, high=1.0)
    s0 = rand(B, H, K, V, seed=16)
    inputs = (q, k, v, g, beta, s0)
    assert_same(
        chunk_gated_delta_rule(q, k, v, g, beta, 0.7, s0, chunk),
        recurrent_gated_delta_rule(q, k, v, g, beta, 0.7, s0),
        inputs,
    )


def test_delta_rule_stores_and_recalls_an_association():
    """With β = 1 and no decay, writing (k, v) then reading with q = k returns v."""
    k = F.normalize(torch.randn(1, 1, 1, 8, dtype=torch.float64), dim=-1)
    v = torch.randn(1, 1, 1, 3, dtype=torch.float64)
    zero, one = torch.zeros(1, 1, 1, dtype=torch.float64), torch.ones(1, 1, 1, dtype=torch.float64)
    _, S = recurrent_gated_delta_rule(k, k, v, zero, one, 1.0)
    out, _ = recurrent_gated_delta_rule(k, k, torch.zeros_like(v), zero, zero, 1.0, S)
    torch.testing.assert_close(out, v)


@pytest.mark.parametrize("T, chunk", [(37, 8), (16, 16), (5, 8)])
def test_lact_analytic_update_equals_autograd(T, chunk):
    B, H, D, Fh = 2, 2, 4, 6
    q, k, v = (F.normalize(rand(B, H, T, D, seed=s), dim=-1) for s in (20, 21, 22))
    lr = rand(B, H, T, 3, seed=23, low=0.0, high=0.5)
    w1, w2, w3 = rand(H, Fh, D, seed=24), rand(H, D, Fh, seed=25), rand(H, Fh, D, seed=26)
    fast = lact(q, k, v, lr, (w1, w2, w3), chunk)
    slow = lact_reference(q, k, v, lr, (w1, w2, w3), chunk)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-9, atol=1e-10)
    for a, b in zip(fast[1].weights, slow[1].weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    grad = torch.randn_like(fast[0])
    inputs = (q, k, v, lr, w1, w2, w3)
    g1 = torch.autograd.grad((fast[0] * grad).sum(), inputs, materialize_grads=True)
    g2 = torch.autograd.grad((slow[0] * grad).sum(), inputs, materialize_grads=True)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def micro_model(variant, **ttt):
    settings = default_settings()["model"]
    settings["ttt"].update(chunk_size=16, every=1, **ttt)
    model = build_model(resolve_model(variant, "micro", settings, context=64), seed=1).double()
    with torch.no_grad():  # wake up zero-initialised fast-weight paths so they matter
        for name, p in model.named_parameters():
            if "ttt_conv" in name:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decoding_with_the_cache_equals_one_forward_pass(variant):
    model = micro_model(variant)
    ids = torch.randint(0, 258, (2, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        pieces = [model(ids[:, :19], cache)]  # prefill, then one token at a time
        pieces += [model(ids[:, t : t + 1], cache) for t in range(19, 40)]
        pieces.append(model(ids[:, 40:], cache))  # and a multi-token continuation
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)
    assert cache.position == 45


@pytest.mark.parametrize("padding", ["chunk", "causal"])
def test_ttt_cache_with_causal_and_chunk_padding(padding):
    model = micro_model("ttt_swa", conv_padding=padding, target="mlp_input", clip_tau=0.05)
    ids = torch.randint(0, 258, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        stepwise = torch.cat([model(ids[:, t : t + 1], cache) for t in range(50)], dim=1)
    torch.testing.assert_close(stepwise, full, rtol=1e-10, atol=1e-10)


def test_ttt_reset_at_documents_processes_each_document_alone():
    model = micro_model("ttt_full", reset_at_documents=True)
    mlp = model.layers[0].mlp
    torch.manual_seed(0)
    x, emb = (
        torch.randn(1, 40, 32, dtype=torch.float64),
        torch.randn(1, 40, 32, dtype=torch.float64),
    )
    starts = torch.zeros(1, 40, dtype=torch.bool)
    starts[0, 23] = True
    packed = mlp(x, emb, doc_starts=starts)
    alone = torch.cat([mlp(x[:, :23], emb[:, :23]), mlp(x[:, 23:], emb[:, 23:])], dim=1)
    torch.testing.assert_close(packed, alone)
    assert not torch.allclose(mlp(x, emb), packed)  # without the reset the second doc differs


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("variant", [v for v in VARIANTS if VARIANTS[v].settings])
def test_analytic_mixer_parameters_match_the_modules(variant, size):
    settings = default_settings()["model"]
    cfg = ModelConfig.from_dict(resolve_model(variant, size, settings, context=4096))
    with torch.device("meta"):
        module = mixer_class(variant)(cfg, 0)
    expected = mixer_parameters(VARIANTS[variant].settings, cfg.__dict__, cfg.mixer)
    assert sum(p.numel() for p in module.parameters()) == expected


def test_greedy_decoding_with_the_cache_matches_recomputing_the_prefix():
    from ltstudy.evaluate.passkey import greedy_decode

    model = micro_model("ttt_swa")
    prompt = torch.randint(0, 258, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    ids, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(20):
            expected.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            ids.append(expected[-1])
    assert greedy_decode(model, prompt, 20, "fp32") == expected


def rms_norm_reference(x, weight, eps, group_size):
    """RMSNorm over groups of `group_size` channels, written out: x / sqrt(mean(x²) + eps) · w."""
    groups = x.view(*x.shape[:-1], -1, group_size)
    normed = groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    return normed.flatten(-2) * weight


@pytest.mark.parametrize("n_groups", [1, 2])
def test_mamba2_output_norm_gates_before_normalising(n_groups):
    """mamba_ssm's Mamba2 uses RMSNormGated(norm_before_gate=False, group_size=d_inner /
    n_groups): RMSNorm(y·silu(z))·w, each group normalised on its own."""
    settings = default_settings()["model"]
    settings["mamba2"]["n_groups"] = n_groups
    cfg = ModelConfig.from_dict(resolve_model("mamba2", "micro", settings, context=64))
    mixer = mixer_class("mamba2")(cfg, 0).double()
    inner = cfg.mixer["n_heads"] * cfg.mixer["head_dim"]
    y, z, w = rand(2, 5, inner, seed=40), rand(2, 5, inner, seed=41), rand(inner, seed=42)
    with torch.no_grad():
        mixer.norm.weight.copy_(w)
    expected = rms_norm_reference(y * z * torch.sigmoid(z), w, cfg.norm_eps, inner // n_groups)
    torch.testing.assert_close(mixer.norm(y, z), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["deltanet", "gla"])
def test_deltanet_and_gla_output_norms_normalise_then_gate(variant):
    """FLA's Gated DeltaNet and GLA: RMSNorm(o)·w·silu(g) per head."""
    settings = default_settings()["model"]
    cfg = ModelConfig.from_dict(resolve_model(variant, "micro", settings, context=64))
    mixer = mixer_class(variant)(cfg, 0).double()
    dim = mixer.o_norm.weight.shape[0]
    o, g, w = rand(2, 5, 3, dim, seed=43), rand(2, 5, 3, dim, seed=44), rand(dim, seed=45)
    with torch.no_grad():
        mixer.o_norm.weight.copy_(w)
    expected = rms_norm_reference(o, w, cfg.norm_eps, dim) * g * torch.sigmoid(g)
    torch.testing.assert_close(mixer.o_norm(o, g), expected, rtol=1e-12, atol=1e-12)


EOS = 256  # the byte tokenizer's end-of-document id


def without_reset(model):
    """The same weights with `reset_at_documents` off."""
    off = copy.deepcopy(model)
    ttt = dataclasses.replace(model.cfg.ttt, reset_at_documents=False)
    off.cfg = dataclasses.replace(model.cfg, ttt=ttt)
    for layer in off.layers:
        layer.mlp.ttt = ttt
    return off


def strong_targets(model):
    """W_target well away from its small diagonal init, so the fast weights change outputs
    far beyond rounding."""
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.ttt_proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(6))


def test_evaluation_resets_fast_weights_at_documents():
    """Two documents joined by EOS, evaluated as one sequence: with the reset, the second
    document's losses are those of the second document evaluated alone. The token mixers are
    silenced (o_proj = 0) so that the fast weights are the only path between tokens."""
    model = micro_model("ttt_full", reset_at_documents=True, document_separator=EOS)
    strong_targets(model)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
    g = torch.Generator().manual_seed(4)
    first, second = torch.randint(0, EOS, (21,), generator=g), torch.randint(0, EOS, (30,))
    ids = torch.cat([first, torch.tensor([EOS]), second])[None]
    start = first.numel() + 1  # not a multiple of the chunk (16): chunks restart there
    with torch.no_grad():
        packed = model.token_losses(ids[:, :-1], ids[:, 1:])[0, start:]
        alone = model.token_losses(second[None, :-1], second[None, 1:])[0]
        leaked = without_reset(model).token_losses(ids[:, :-1], ids[:, 1:])[0, start:]
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(leaked, alone)  # without the reset the first document leaks in


def test_cached_decoding_resets_fast_weights_at_documents():
    """Decoding through the cache restarts the fast weights where the uncached forward does,
    also when a call ends with EOS (the next call's first token starts a document), with
    the rows of a batch starting documents at different places."""
    model = micro_model("ttt_swa", reset_at_documents=True, document_separator=EOS)
    strong_targets(model)
    ids = torch.randint(0, EOS, (2, 45), generator=torch.Generator().manual_seed(5))
    ids[0, 18] = ids[0, 41] = ids[1, 30] = EOS  # 18 ends the prefill, 30 a one-token call
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        pieces = [model(ids[:, :19], cache)]
        pieces += [model(ids[:, t : t + 1], cache) for t in range(19, 40)]
        pieces.append(model(ids[:, 40:], cache))
        leaked = without_reset(model)(ids)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(full[:, :19], leaked[:, :19], rtol=0, atol=1e-12)  # alike
    assert not torch.allclose(full[0, 19:], leaked[0, 19:])  # the reset is in use
    assert not torch.allclose(full[1, 31:], leaked[1, 31:])
