"""Perplexity protocols against naive references that score one token per forward pass.

The sliding window follows Hugging Face's guide (transformers docs/source/en/perplexity.md):
windows of `length` tokens start every `stride` tokens; a token is scored once, by the first
window that ends after it, with the tokens of that window before it as context (a window's
first token has none, so it is not scored). The final block is the last `block` tokens of a
document, each with the tokens before it inside the document's last `length` tokens.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ltstudy.config import ConfigError, default_settings, validate_config
from ltstudy.evaluate.perplexity import final_block_nll, sliding_window_nll
from ltstudy.models.presets import resolve_model
from ltstudy.models.transformer import build_model


@pytest.fixture(scope="module")
def model():
    cfg = resolve_model("full", "micro", default_settings()["model"], context=64)
    return build_model(cfg, seed=0).eval()


def next_token_nll(model, context: torch.Tensor, target: int) -> float:
    """-log p(target | context): one forward pass over exactly these tokens."""
    with torch.no_grad():
        logits = model(context[None])[0, -1].double()
    return -float(F.log_softmax(logits, dim=-1)[target])


def tokens(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("n", "length", "stride"), [(50, 12, 5), (40, 12, 12), (31, 7, 3)])
def test_sliding_window_scores_each_token_once_with_its_window_before_it(model, n, length, stride):
    ids = tokens(n, model.cfg.vocab_size, seed=n)
    expected, count = 0.0, 0
    for i in range(1, n):
        k = 0
        while min(k * stride + length, n) <= i:  # the first window that ends after token i
            k += 1
        begin = k * stride
        if begin == i:  # first of its window: no context, never scored
            continue
        if k > 0:
            assert i - begin >= length - stride  # the guide's minimum context
        expected += next_token_nll(model, ids[begin:i], int(ids[i]))
        count += 1
    nll, scored, _ = sliding_window_nll(model, ids, length, stride, dtype="fp32")
    assert scored == count
    assert nll == pytest.approx(expected, rel=1e-4)


def test_sliding_window_rejects_a_stride_longer_than_the_window(model):
    with pytest.raises(ValueError, match=r"stride 9 .* window length 8"):
        sliding_window_nll(model, tokens(40, model.cfg.vocab_size, 0), 8, 9, dtype="fp32")


def test_final_block_reads_a_window_of_length_tokens(model):
    length, block = 24, 8
    vocab = model.cfg.vocab_size
    # exactly `length` tokens, exactly length + block (the case that crashed), and longer
    docs = [tokens(n, vocab, seed=n) for n in (length, length + block, length + 37)]
    expected = 0.0
    for doc in docs:
        n = doc.numel()
        window_start = n - length
        for i in range(n - block, n):
            expected += next_token_nll(model, doc[window_start:i], int(doc[i]))
    nll, scored, windows = final_block_nll(model, docs, length, block, dtype="fp32")
    assert (scored, windows) == (3 * block, 3)
    assert nll == pytest.approx(expected, rel=1e-4)
    assert math.isfinite(nll)


def test_final_block_needs_context_before_the_block(model):
    doc = tokens(40, model.cfg.vocab_size, 0)
    with pytest.raises(ValueError, match=r"evaluate\.perplexity\.block"):
        final_block_nll(model, [doc], 16, 16, dtype="fp32")


def test_a_block_as_long_as_every_length_fails_naming_the_field(micro_raw):
    micro_raw["defaults"]["evaluate"]["perplexity"]["block"] = 128  # lengths [64, 128]
    with pytest.raises(ConfigError, match=r"`evaluate\.perplexity\.block`: 128"):
        validate_config(micro_raw)
