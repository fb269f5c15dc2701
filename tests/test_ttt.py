"""In-Place TTT: the prefix-sum form equals the sequential apply-then-update loop, and a TTT
model at initialisation computes exactly its backbone's logits."""

import dataclasses

import pytest
import torch

from ltstudy.config import default_settings
from ltstudy.models.config import ModelConfig
from ltstudy.models.presets import resolve_model
from ltstudy.models.transformer import build_model
from ltstudy.models.ttt import InPlaceTTTMLP, TargetConv
from ltstudy.ops.ttt import inplace_ttt, inplace_ttt_reference

TTT = {**default_settings()["model"]["ttt"], "chunk_size": 16, "eta": 0.5, "every": 1}


def _inputs(B=2, T=53, D=6, F=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, F, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(D, F, generator=g, dtype=torch.float64, requires_grad=True)
    return z, v, w


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 53, 64])
@pytest.mark.parametrize("clip", [None, ("after_eta", 0.5), ("before_eta", 0.5)])
def test_prefix_sum_equals_sequential_loop(chunk_size, clip):
    z, v, w = _inputs()
    kwargs = {"eta": 0.7, "chunk_size": chunk_size}
    if clip:
        kwargs.update(clip_order=clip[0], clip_tau=clip[1])
    state = torch.randn(z.shape[0], *w.shape, dtype=torch.float64, requires_grad=True)
    fast, fast_state = inplace_ttt(z, v, w, **kwargs, state=state)
    slow, slow_state = inplace_ttt_reference(z, v, w, **kwargs, state=state)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast_state, slow_state, rtol=1e-10, atol=1e-10)
    grad_out, grad_state = torch.randn_like(fast), torch.randn_like(fast_state)
    # (with a single chunk v is never used: its update would only reach later chunks)
    inputs = (z, v, w, state)
    g_fast = torch.autograd.grad(
        (fast * grad_out).sum() + (fast_state * grad_state).sum(), inputs, materialize_grads=True
    )
    g_slow = torch.autograd.grad(
        (slow * grad_out).sum() + (slow_state * grad_state).sum(), inputs, materialize_grads=True
    )
    for a, b in zip(g_fast, g_slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_first_chunk_uses_only_the_initial_weight():
    z, v, w = _inputs()
    out, _ = inplace_ttt(z, v, w, eta=1.0, chunk_size=16)
    torch.testing.assert_close(out[:, :16], z[:, :16] @ w.T)
    # and later chunks really do change: the fast weight is in use
    assert not torch.allclose(out[:, 16:], z[:, 16:] @ w.T)


def test_clipping_bounds_each_update():
    z, v, w = _inputs()
    tau = 1e-3
    out, _ = inplace_ttt(z, v, w, eta=1.0, chunk_size=16, clip_tau=tau)
    # second chunk sees exactly one clipped update: ||Z_1 dW^T|| <= ||Z_1|| * tau
    second = out[:, 16:32] - z[:, 16:32] @ w.T
    for b in range(z.shape[0]):
        assert torch.linalg.matrix_norm(second[b]) <= torch.linalg.matrix_norm(
            z[b, 16:32]
        ) * tau * (1 + 1e-9)


@pytest.mark.parametrize("padding", ["chunk", "causal"])
def test_target_conv_padding(padding):
    conv = TargetConv(dim=3, kernel=5, padding=padding, chunk_size=8).double()
    with torch.no_grad():
        conv.weight.normal_()
    x = torch.randn(2, 20, 3, dtype=torch.float64)
    y = conv(x)
    assert y.shape == x.shape
    # Changing token t may only affect positions that can legally see it.
    t = 9
    x2 = x.clone()
    x2[:, t] += 1.0
    changed = (conv(x2) - y).abs().sum(dim=(0, 2)) > 0
    positions = set(changed.nonzero().flatten().tolist())
    if padding == "causal":
        assert positions == set(range(t, t + 5))
    else:  # two-sided, but never across the chunk edge (chunk 8..15 holds t = 9)
        assert positions == {8, 9, 10, 11}


@pytest.mark.parametrize("backbone", ["full", "swa"])
@pytest.mark.parametrize("target", ["embeddings", "mlp_input"])
def test_ttt_at_init_gives_backbone_logits_exactly(backbone, target):
    ttt = {**TTT, "target": target}
    base_cfg = resolve_model(backbone, "micro", {"ttt": ttt})
    ttt_cfg = resolve_model(f"ttt_{backbone}", "micro", {"ttt": ttt})
    base, with_ttt = build_model(base_cfg, seed=3), build_model(ttt_cfg, seed=3)
    assert set(base.state_dict()) < set(with_ttt.state_dict())
    ids = torch.randint(
        0, base_cfg["vocab_size"], (2, 70), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        assert torch.equal(base(ids), with_ttt(ids))


def test_ttt_layers_selected_every_k():
    cfg = ModelConfig.from_dict(resolve_model("ttt_full", "500M", {"ttt": {**TTT, "every": 6}}))
    assert cfg.ttt.layers == (0, 6, 12, 18)
    assert [cfg.has_ttt(i) for i in range(8)] == [True] + [False] * 5 + [True, False]


def _ttt_mlp(**ttt):
    """A TTT MLP (float64) with a random target conv and W_target, so its writes are large."""
    cfg = ModelConfig.from_dict(resolve_model("ttt_full", "micro", {"ttt": {**TTT, **ttt}}))
    mlp = InPlaceTTTMLP(cfg.d_model, cfg.d_ff, cfg.ttt).double()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in (mlp.ttt_conv.weight, mlp.ttt_proj.weight):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return mlp


def _second_chunk(mlp, x, emb, write):
    """The paper's apply-then-update by hand: chunk 2 reads W_down + `write`(ΔW_1), where
    ΔW_1 = V̂_1ᵀ Z_1 is chunk 1's update before η."""
    C = mlp.ttt.chunk_size
    z, v = mlp.activations(x), mlp.target(emb)
    delta = v[0, :C].T @ z[0, :C]
    return z[0, C : 2 * C] @ (mlp.down_proj.weight + write(delta)).T


def test_clipping_defaults_to_the_papers_rule():
    """The paper rescales ΔW_i (before η) to Frobenius norm τ, and only at inference."""
    assert TTT["clip_order"] == "before_eta" and TTT["clip_at"] == "inference"
    eta, tau = 0.5, 1e-3
    mlp = _ttt_mlp(eta=eta, clip_tau=tau)
    g = torch.Generator().manual_seed(8)
    d = mlp.ttt_proj.weight.shape[0]
    x = torch.randn(1, 32, d, generator=g, dtype=torch.float64)
    emb = torch.randn(1, 32, d, generator=g, dtype=torch.float64)
    clipped = _second_chunk(mlp, x, emb, lambda d: eta * tau * d / torch.linalg.matrix_norm(d))
    free = _second_chunk(mlp, x, emb, lambda d: eta * d)
    assert not torch.allclose(clipped, free)
    with torch.no_grad():  # inference: eval mode, or no autograd
        torch.testing.assert_close(mlp.eval()(x, emb)[0, 16:], clipped)
        torch.testing.assert_close(mlp.train()(x, emb)[0, 16:], clipped)
    torch.testing.assert_close(mlp.train()(x, emb)[0, 16:], free)  # training: no clipping
    mlp.ttt = dataclasses.replace(mlp.ttt, clip_at="always")
    torch.testing.assert_close(mlp.train()(x, emb)[0, 16:], clipped)
