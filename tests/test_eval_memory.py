"""Evaluation memory on one process (issue 14): a generation prefill runs the LM head on the
decoded position only, and decoding writes keys and values into preallocated buffers instead
of copying the cache every token, with the same values as the concatenating cache."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import polars as pl
import pytest
import torch
import torch.nn.functional as F

from ltstudy.config import default_settings
from ltstudy.data.tokenizer import get_tokenizer
from ltstudy.evaluate.lm_eval import HarnessLM
from ltstudy.evaluate.passkey import greedy_decode
from ltstudy.evaluate.throughput import _step
from ltstudy.models.attention import attend_cached, reserve_kv_cache
from ltstudy.models.presets import resolve_model
from ltstudy.models.transformer import build_model
from ltstudy.ops.attention import repeat_kv, sliding_window_mask
from scripts.eval_memory import NewTensorBytes
from tests.conftest import ROOT


def micro(variant: str = "full"):
    cfg = resolve_model(variant, "micro", default_settings()["model"], context=64)
    return build_model(cfg, seed=0).eval()


def head_rows(model) -> list[int]:
    """Rows the LM head sees per call, recorded from now on."""
    rows: list[int] = []
    model.lm_head.register_forward_hook(lambda m, inputs, out: rows.append(inputs[0].shape[1]))
    return rows


def attention_caches(cache) -> list[dict]:
    return [layer["mixer"] for layer in cache.layers if "k" in layer.get("mixer", {})]


def test_logits_at_equals_the_forward_at_those_positions():
    model = micro().double()
    ids = torch.randint(0, 258, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        rows = head_rows(model)
        picked = model.logits_at(ids, [0, 7, -1])
    assert rows == [3]
    torch.testing.assert_close(picked, full[:, [0, 7, -1]], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["full", "hybrid"])
def test_generation_computes_logits_at_the_decoded_position_only(variant):
    """passkey/RULER greedy decoding, lm_eval's generate_until and the decode throughput point:
    a 40-token prompt never reaches the LM head as 40 rows, and the tokens are those of
    recomputing the whole prefix each step."""
    model = micro(variant)
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ids, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(12):
            expected.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            ids.append(expected[-1])
    rows = head_rows(model)
    assert greedy_decode(model, prompt, 12, "fp32") == expected
    assert rows == [1] * 12
    rows.clear()
    lm = HarnessLM(model, get_tokenizer("bytes"), max_length=64)
    prompt_text = bytes(range(65, 105)).decode()
    lm.generate_until([SimpleNamespace(args=(prompt_text, {"until": [], "max_gen_toks": 5}))])
    assert rows and set(rows) == {1}
    rows.clear()
    tokens = torch.tensor([prompt])
    _step(model, tokens, "decode", "fp32", decode_tokens=4)()
    assert rows == [1] * 5  # the prefill's last position, then 4 steps


def test_decoding_writes_the_key_value_cache_in_place():
    """With the capacity reserved, every decode step writes into the same buffers, and a step
    creates far fewer bytes than the cache holds (no per-token concatenation, no copy of the
    keys per grouped query head)."""
    model = micro()
    prompt = torch.randint(0, 256, (1, 2000), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache()
    reserve_kv_cache(cache, 2000 + 16)
    with torch.no_grad():
        token = model.logits_at(prompt, -1, cache).argmax(-1)
        buffers = [(c["k"].data_ptr(), c["v"].data_ptr()) for c in attention_caches(cache)]
        cache_bytes = sum(c["k"].nbytes + c["v"].nbytes for c in attention_caches(cache))
        for _ in range(16):
            with NewTensorBytes() as created:
                token = model.logits_at(token, -1, cache).argmax(-1)
            assert created.bytes < cache_bytes / 10
            assert [(c["k"].data_ptr(), c["v"].data_ptr()) for c in attention_caches(cache)] == (
                buffers
            )
    assert all(c["end"] == 2016 for c in attention_caches(cache))


def test_an_unreserved_cache_grows_geometrically_and_a_window_stays_bounded():
    """Without a reservation the full-attention buffer doubles when full (a few moves in 100
    steps, not one per token); a sliding window's buffer holds at most 2 * window keys and
    moves them once every `window` steps."""
    model = micro("hybrid")  # layer 0: window, layer 1: full attention
    window = model.layers[0].self_attn.window
    ids = torch.randint(0, 256, (1, 110), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache()
    moves = [0, 0]
    with torch.no_grad():
        model(ids[:, :10], cache)
        for t in range(10, 110):
            before = [layer["mixer"]["k"] for layer in cache.layers]
            model(ids[:, t : t + 1], cache)
            for index, layer in enumerate(cache.layers):
                moves[index] += layer["mixer"]["k"].data_ptr() != before[index].data_ptr()
            assert cache.layers[0]["mixer"]["k"].shape[2] <= 2 * window
    assert moves[1] == 4  # 10 -> 20 -> 40 -> 80 -> 160 slots
    assert moves[0] <= 100 // window + 1
    live = cache.layers[0]["mixer"]
    assert live["end"] - live["start"] == window - 1


def concatenating_attend_cached(q, k, v, window, cache):
    """attend_cached before issue 14: the cache concatenated (copied) every call."""
    if "k" in cache:
        k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
    t_new, t_all = q.shape[2], k.shape[2]
    if t_new == t_all:
        from ltstudy.ops.attention import attention

        y = attention(q, k, v, window)
    else:
        n_rep = q.shape[1] // k.shape[1]
        mask = sliding_window_mask(t_new, t_all, window or t_all, q.device)
        y = F.scaled_dot_product_attention(
            q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask
        )
    keep = t_all if window is None else min(t_all, window - 1)
    cache["k"], cache["v"] = k[:, :, t_all - keep :], v[:, :, t_all - keep :]
    return y


@pytest.mark.parametrize("window", [None, 5, 12])
def test_the_preallocated_cache_gives_the_concatenating_caches_values(window):
    """Bit for bit on the CPU: prefill, single tokens, a multi-token continuation, more tokens;
    grouped-query heads (4 query heads on 2 key/value heads)."""
    g = torch.Generator().manual_seed(4)
    new, old = {}, {}
    for t in [7, 1, 1, 1, 6, *[1] * 20, 3, 1]:
        q = torch.randn(2, 4, t, 8, generator=g)
        k, v = torch.randn(2, 2, t, 8, generator=g), torch.randn(2, 2, t, 8, generator=g)
        expected = concatenating_attend_cached(q, k, v, window, old)
        assert torch.equal(attend_cached(q, k, v, window, new), expected)


def test_eval_memory_script_writes_its_table(tmp_path):
    """The benchmark at micro size: the whole prompt's logits only on the old path, and decode
    steps that create less than the key/value cache holds."""
    context, vocab = 512, 258
    command = ["scripts/eval_memory.py", "--size", "micro", "--context", str(context)]
    subprocess.run(
        [sys.executable, *command, "--new-tokens", "4", "--out", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    table = pl.read_parquet(tmp_path / "eval-memory-cpu.parquet")
    assert table["mode"].to_list() == ["all-logits", "last-logits", "decode"]
    assert (table["status"] == "ok").all()
    logits = dict(zip(table["mode"], table["logits_mb"], strict=True))
    assert logits["all-logits"] == pytest.approx(context * vocab * 4 / 1e6)
    assert logits["last-logits"] == logits["decode"] == pytest.approx(vocab * 4 / 1e6)
    cache_mb = 2 * 2 * 1 * context * 16 * 4 / 1e6  # layers, k and v, kv heads, head_dim
    assert table.filter(pl.col("mode") == "decode")["step_mb"][0] < cache_mb / 10
    assert "decode" in (tmp_path / "eval-memory-cpu.md").read_text()
