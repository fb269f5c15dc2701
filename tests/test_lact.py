"""LaCT against its official LM code (a1600012888/LaCT, lact_llm): `block_causal_lact_swiglu`,
`zeropower_via_newtonschulz5` and `LaCTSWIGLULayer.forward`, transcribed here in float64 in the
official layout ([batch * heads, ...], w0/w1/w2) and compared with ours, values and gradients."""

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from ltstudy.config import default_settings
from ltstudy.models.presets import resolve_model
from ltstudy.models.transformer import build_model
from ltstudy.ops.lact import lact, lact_reference, newton_schulz

MUON = [(3.4445, -4.7750, 2.0315)] * 5  # Muon's published quintic (Keller Jordan), 5 steps
LACT_LLM_NS = [  # lact_llm/ttt_operation.py: zeropower_via_newtonschulz5
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
]
OFFICIAL = {  # LaCTSWIGLUConfig / LaCTSWIGLULayer defaults
    "base_lr": 0.001,
    "hidden_ratio": 1,
    "chunk_size": 2048,
    "use_muon": False,
    "use_momentum": True,
    "v_silu": True,
    "fast_rope": True,
    "qk_scale_offset": True,
    "learnable_ttt_scale": True,
}


def official_ns(g, coefficients):
    x = g.transpose(1, 2) if g.size(1) > g.size(2) else g
    x = x / (x.norm(dim=(1, 2), keepdim=True) + 1e-7)
    for a, b, c in coefficients:
        A = x @ x.transpose(1, 2)
        x = a * x + (b * A + c * A @ A) @ x
    return x.transpose(1, 2) if g.size(1) > g.size(2) else x


def official_lact(w0, w1, w2, q, k, v, lr0, lr1, lr2, chunk, use_muon=False, momentum=None):
    """block_causal_lact_swiglu: w0, w2 [b, dh, dk], w1 [b, dv, dh]; q, k, v [b, l, d];
    lr*, momentum [b, l, 1]; f(x) = w1 (silu(w0 x) * (w2 x))."""
    norms = [w.norm(dim=2, keepdim=True) for w in (w0, w1, w2)]
    if momentum is not None:
        m0, m1, m2 = (torch.zeros_like(w) for w in (w0, w1, w2))
    q, v = q.transpose(1, 2), v.transpose(1, 2)
    outputs, e = [], 0
    for s in range(0, k.shape[1] - chunk, chunk):
        e = s + chunk
        ki, vi, qi = k[:, s:e], v[:, :, s:e], q[:, :, s:e]
        outputs.append(torch.bmm(w1, F.silu(torch.bmm(w0, qi)) * torch.bmm(w2, qi)))
        gate_before_act = torch.bmm(w0, ki.transpose(1, 2))
        hidden_before_mul = torch.bmm(w2, ki.transpose(1, 2))
        hidden = F.silu(gate_before_act) * hidden_before_mul
        dhidden = torch.bmm(w1.transpose(1, 2), vi)
        dhidden_before_mul = dhidden * F.silu(gate_before_act)
        dgate = dhidden * hidden_before_mul
        sigma = torch.sigmoid(gate_before_act)
        dgate_before_act = dgate * sigma * (1 + gate_before_act * (1 - sigma))
        dw1 = torch.bmm(vi, hidden.transpose(1, 2) * lr1[:, s:e])
        dw0 = torch.bmm(dgate_before_act, ki * lr0[:, s:e])
        dw2 = torch.bmm(dhidden_before_mul, ki * lr2[:, s:e])
        if momentum is not None:
            m_i = momentum[:, s:e].mean(dim=1, keepdim=True)
            dw0, dw1, dw2 = dw0 + m0 * m_i, dw1 + m1 * m_i, dw2 + m2 * m_i
            m0, m1, m2 = dw0, dw1, dw2
        if use_muon:
            dw0, dw1, dw2 = (official_ns(d, LACT_LLM_NS) for d in (dw0, dw1, dw2))
        w0, w1, w2 = w0 + dw0, w1 + dw1, w2 + dw2
        w0, w1, w2 = (
            w / (w.norm(dim=2, keepdim=True) + 1e-5) * n
            for w, n in zip((w0, w1, w2), norms, strict=True)
        )
    qi = q[:, :, e:]
    outputs.append(torch.bmm(w1, F.silu(torch.bmm(w0, qi)) * torch.bmm(w2, qi)))
    return torch.cat(outputs, dim=2).transpose(1, 2)


def rand(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()


def grads(out, inputs, seed=0):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * weight).sum(), inputs, materialize_grads=True)


# --- Newton-Schulz --------------------------------------------------------------------------


@pytest.mark.parametrize("coefficients", [MUON, LACT_LLM_NS], ids=["muon", "lact_llm"])
@pytest.mark.parametrize("shape", [(3, 6, 6), (2, 5, 9), (2, 9, 5)])
def test_newton_schulz_maps_each_singular_value_by_its_quintic(coefficients, shape):
    """X <- aX + bXXᵀX + cXXᵀXXᵀX keeps singular vectors and maps each singular value σ (after
    scaling G to Frobenius norm 1) by p(σ) = aσ + bσ³ + cσ⁵; check that through the SVD."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(g, full_matrices=False)
    s = S / (S.square().sum(-1, keepdim=True).sqrt() + 1e-7)
    for a, b, c in coefficients:
        s = a * s + b * s**3 + c * s**5
    expected = U @ torch.diag_embed(s) @ Vh
    torch.testing.assert_close(newton_schulz(g, coefficients), expected, rtol=1e-9, atol=1e-10)


def test_newton_schulz_default_is_the_official_lm_schedule_and_orthogonalises():
    """Singular values spread over 1 .. 30 all end near 1 (Muon's constant quintic: within
    about 0.7 .. 1.2, "S' ~ U(0.5, 1.5)" as its authors put it)."""
    gen = torch.Generator().manual_seed(2)
    U, _ = torch.linalg.qr(torch.randn(8, 16, 16, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(8, 12, 12, generator=gen, dtype=torch.float64))
    spread = torch.diag(torch.logspace(0, math.log10(30), 12, dtype=torch.float64))
    g = U[..., :12] @ spread @ V.mT  # [8, 16, 12], singular values 1 .. 30
    out = newton_schulz(g)
    torch.testing.assert_close(out, official_ns(g, LACT_LLM_NS), rtol=1e-12, atol=1e-12)
    after = torch.linalg.svdvals(out)
    assert after.min() > 0.85 and after.max() < 1.15, after
    after = torch.linalg.svdvals(newton_schulz(g, MUON))
    assert after.min() > 0.6 and after.max() < 1.25, after


# --- the chunked update -----------------------------------------------------------------------


@pytest.mark.parametrize("use_muon", [False, True])
@pytest.mark.parametrize("with_momentum", [False, True])
@pytest.mark.parametrize("T, chunk", [(37, 8), (16, 8)])
def test_update_equals_the_official_block_causal_lact_swiglu(use_muon, with_momentum, T, chunk):
    B, H, D, Fh = 2, 2, 4, 6
    q, k, v = (rand(B, H, T, D, seed=s) for s in (1, 2, 3))
    lr = torch.rand(B, H, T, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lr.requires_grad_()
    momentum = None
    if with_momentum:
        momentum = torch.rand(B, H, T, generator=torch.Generator().manual_seed(5))
        momentum = momentum.double().requires_grad_()
    w1, w2, w3 = rand(H, Fh, D, seed=6), rand(H, D, Fh, seed=7), rand(H, Fh, D, seed=8)
    inputs = (q, k, v, lr, w1, w2, w3) + ((momentum,) if with_momentum else ())

    def flat(x):  # [B, H, T, ...] -> [(B H), T, ...]
        return x.flatten(0, 1)

    lrs = [flat(lr[..., i, None]) for i in range(3)]
    expected = official_lact(
        w1.repeat(B, 1, 1), w2.repeat(B, 1, 1), w3.repeat(B, 1, 1),
        flat(q), flat(k), flat(v), *lrs, chunk, use_muon,
        None if momentum is None else flat(momentum[..., None]),
    ).unflatten(0, (B, H))  # fmt: skip
    expected_grads = grads(expected, inputs)
    for op in (lact, lact_reference):
        out, _ = op(q, k, v, lr, (w1, w2, w3), chunk, momentum=momentum, use_muon=use_muon)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
        for a, b in zip(grads(out, inputs), expected_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    plain, _ = lact(q, k, v, lr, (w1, w2, w3), chunk)
    if (use_muon or with_momentum) and 2 * chunk < T:  # the option changes later chunks
        assert (plain - expected).abs().max() > 1e-3


# --- the layer -------------------------------------------------------------------------------


def micro_lact(**options):
    settings = default_settings()["model"]
    settings["lact"] = {"base_lr": 0.3, **options}  # large steps, so every option shows
    cfg = resolve_model("lact", "micro", settings, context=64)
    model = build_model(cfg, seed=3).double()
    with torch.no_grad():  # move the learned parts off their initial values so they matter
        for name, p in model.named_parameters():
            if any(s in name for s in ("fast_q_norm", "fast_k_norm", "ttt_scale", "momentum")):
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def rope_tables(T, D, base):
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def official_layer(layer, cfg, x, rope, attention):
    """LaCTSWIGLULayer.forward's fast-weight branch (the attention output given), per option."""
    m = cfg.mixer
    B, T, _ = x.shape
    H, D, rep = cfg.n_heads, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    q = layer.q_proj(x)
    k = layer.k_proj(x).view(B, T, -1, D).repeat_interleave(rep, dim=2).flatten(2)
    v = layer.v_proj(x).view(B, T, -1, D).repeat_interleave(rep, dim=2).flatten(2)
    if m["qk_scale_offset"]:  # _rescale_qk: qk_scale, qk_offset [hidden, 2]
        qk_scale = torch.stack([layer.fast_q_norm.weight, layer.fast_k_norm.weight], dim=-1)
        qk_offset = torch.stack([layer.fast_q_norm.bias, layer.fast_k_norm.bias], dim=-1)
        q, k = q * qk_scale[:, 0] + qk_offset[:, 0], k * qk_scale[:, 1] + qk_offset[:, 1]

    def heads(t):  # 'b s (n_h d) -> (b n_h) s d'
        return t.view(B, T, H, -1).transpose(1, 2).flatten(0, 1)

    fq, fk, fv = heads(F.silu(q)), heads(F.silu(k)), heads(F.silu(v) if m["v_silu"] else v)
    fq, fk = (t / (t.norm(dim=-1, keepdim=True) + 1e-5) for t in (fq, fk))
    if m["fast_rope"]:
        cos, sin = rope

        def rotate(t):  # rotate-half; in float32 as ours (the official code runs in bfloat16)
            t1, t2 = t.chunk(2, dim=-1)
            return (t.float() * cos + torch.cat([-t2, t1], dim=-1).float() * sin).double()

        fq, fk = rotate(fq), rotate(fk)
    base_lr_inv = m["base_lr"] + math.log(-math.expm1(-m["base_lr"]))
    lr = F.softplus(layer.lr_proj(x) + base_lr_inv)
    lr0, lr1, lr2 = heads(lr).chunk(3, dim=-1)
    momentum = heads(torch.sigmoid(layer.momentum_proj(x))) if m["use_momentum"] else None
    out = official_lact(
        layer.w1.repeat(B, 1, 1), layer.w2.repeat(B, 1, 1), layer.w3.repeat(B, 1, 1),
        fq, fk, fv, lr0, lr1, lr2, m["chunk_size"], m["use_muon"], momentum,
    )  # fmt: skip
    out = out.float()  # our RMSNorm's float32, as for RoPE
    out = out * torch.rsqrt(out.square().mean(-1, keepdim=True) + cfg.norm_eps)
    out = (out * layer.ttt_norm.weight.float()).double()
    if m["learnable_ttt_scale"]:
        out = out * heads(F.silu(layer.ttt_scale_proj(x)))
    y = attention + out.unflatten(0, (B, H))
    return layer.o_proj(y.transpose(1, 2).flatten(2))


OPTIONS = [key for key, value in OFFICIAL.items() if isinstance(value, bool)]


@pytest.mark.parametrize("flip", [None, *OPTIONS])
def test_layer_equals_the_official_layer(flip):
    """The official defaults, and each option flipped: values and gradients (input and every
    parameter)."""
    model = micro_lact(**({flip: not OFFICIAL[flip]} if flip else {}))
    layer, cfg = model.layers[0].self_attn, model.cfg
    x = rand(2, 40, cfg.d_model, seed=9)
    rope = rope_tables(40, cfg.head_dim, cfg.rope_base)
    out = layer(x, rope)
    expected = official_layer(layer, cfg, x, rope, layer.attention(*layer.project(x), rope, None))
    # RoPE and RMSNorm compute in float32 (both sides), hence the tolerances
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    inputs = [x, *layer.parameters()]
    for a, b in zip(grads(out, inputs), grads(expected, inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_changes_the_layer(option):
    """Parameters are seeded by name, so both layers share all the weights they both have."""
    x = rand(1, 40, 32, seed=10)
    outputs = []
    for value in (True, False):
        model = micro_lact(**{option: value})
        rope = rope_tables(40, model.cfg.head_dim, model.cfg.rope_base)
        outputs.append(model.layers[0].self_attn(x, rope))
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


def test_defaults_are_the_official_ones():
    cfg = resolve_model("lact", "500M", default_settings()["model"], context=4096)
    assert {k: cfg["mixer"][k] for k in OFFICIAL} == OFFICIAL


def test_init_starts_from_the_official_values():
    """qk scale 1 and offset 0; η = base_lr (0.001) where lr_proj's input is 0."""
    settings = default_settings()["model"]
    model = build_model(resolve_model("lact", "micro", settings, context=64), seed=0)
    layer = model.layers[0].self_attn
    for norm in (layer.fast_q_norm, layer.fast_k_norm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    eta = F.softplus(layer.lr_proj(torch.zeros(1, model.cfg.d_model)) + layer.base_lr)
    torch.testing.assert_close(eta, torch.full_like(eta, 0.001))


@pytest.mark.parametrize("options", [{}, {"use_muon": True}, {"use_momentum": False}])
def test_lact_is_causal_and_decodes_as_one_forward_pass(options):
    model = micro_lact(**options)
    ids = torch.randint(0, 258, (2, 45), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 30] = (changed[:, 30] + 1) % 258
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(model(changed)[:, :30], full[:, :30], rtol=0, atol=0)
        assert (model(changed)[:, 30:] - full[:, 30:]).abs().max() > 1e-6
        cache = model.new_cache()
        pieces = [model(ids[:, :19], cache)]  # prefill, token by token, then several
        pieces += [model(ids[:, t : t + 1], cache) for t in range(19, 37)]
        pieces.append(model(ids[:, 37:], cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)
