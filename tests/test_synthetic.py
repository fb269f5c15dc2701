"""Synthetic copy documents: each kind holds what it promises, and the mix is exact."""

import itertools
import random
import re

import polars as pl
import torch

from ltstudy.config import validate_config
from ltstudy.data.dataset import TokenData, build_dataset
from ltstudy.data.synthetic import (
    ALPHANUMERIC,
    PASSKEY_LEAD,
    chars_document,
    passkey_document,
    recall_document,
    repeat_document,
    synthetic_documents,
)
from ltstudy.data.tokenizer import ByteTokenizer
from ltstudy.evaluate.passkey_prompt import NEEDLE, QUESTION

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
FILLERS = ["The river runs east. ", "A lamp stood by the door. ", "Nothing happened then. "]


def test_chars_document_is_random_runs_each_followed_by_its_copy():
    text = chars_document(random.Random(0), 500)
    lines = text.splitlines()
    assert len(text) >= 500 and len(lines) > 3
    for line in lines:
        first, second = line.split(" ")
        assert first == second and 8 <= len(first) <= 64 and set(first) <= set(ALPHANUMERIC)
    assert len({len(line) for line in lines}) > 1  # no fixed copy offset


def test_recall_and_repeat_documents_hold_their_answers_earlier():
    rng, checked = random.Random(1), 0
    for _ in range(20):
        text, answers = recall_document(rng, WORDS, FILLERS, 400)
        first_query = min(start for start, _ in answers)
        for start, end in answers:  # each marked answer is a value stated before the queries
            value = text[start:end]  # the digits and the period that ends them
            assert re.fullmatch(r"\d+\.", value) and text.index(value) < first_query
        statements = dict(re.findall(r"The (\w+) key is (\d+)\. ", text))
        if statements:  # the "key is" template: each query's value was stated before it
            checked += 1
            queries = re.findall(r"What is the (\w+) key\? The \w+ key is (\d+)\. ", text)
            assert queries and all(statements[k] == v for k, v in queries)
            assert all(text.index(f"The {k} key is {v}. ") < first_query for k, v in queries)
        run, copy = repeat_document(rng, WORDS, 200).split(". ", 1)
        assert copy == run + "."
    assert checked > 0


def test_passkey_document_hides_the_key_and_marks_it_after_the_question():
    rng, distances, lengths = random.Random(2), set(), set()
    for _ in range(60):
        text, [(start, end)] = passkey_document(rng, FILLERS, 400)
        key, period = text[start : end - 1], text[end - 1]
        needle = NEEDLE.format(key=key)
        assert key.isdigit() and period == "." and len(text) <= 400
        # the evaluation's (Landmark's) layout: lead, filler, needle, filler, question, by "\n",
        # the filler whole sentences
        lead, before, line, after, question = text.split("\n")
        assert lead == PASSKEY_LEAD and line == needle and question == f"{QUESTION} {key}."
        for filler in (before, after):
            rest = filler
            while rest:
                sentence = next(f.strip() for f in FILLERS if rest.startswith(f.strip()))
                rest = rest[len(sentence) :].lstrip(" ")
        assert text.index(needle) < start
        assert text.count(key) == 3  # twice in the needle, once as the answer
        distances.add((start - text.index(needle)) // 50)
        lengths.add(len(text) // 50)
    assert len(distances) > 4 and len(lengths) > 4  # needles near and far, texts short and long


def test_mix_is_an_exact_cycle_and_reproducible():
    def kinds(mix, seed=0):
        docs = list(itertools.islice(synthetic_documents(seed, WORDS, FILLERS, 300, mix), 9))
        return [d.id.split("/")[1] for d in docs], [d.text for d in docs]

    assert kinds({"recall": 1, "repeat": 1})[0][:4] == ["recall", "repeat", "recall", "repeat"]
    order, texts = kinds({"recall": 1, "chars": 2})
    assert order == ["recall", "chars", "chars"] * 3
    assert texts == kinds({"recall": 1, "chars": 2})[1]
    assert texts != kinds({"recall": 1, "chars": 2}, seed=1)[1]


def test_dataset_adds_the_configured_kinds_to_training_only(micro_raw, tmp_path):
    micro_raw["data"]["synthetic"] = {"fraction": 0.3, "size": 300, "mix": {"chars": 1}}
    data = validate_config(micro_raw)["data"]
    assert data["synthetic"]["mix"] == {"chars": 1, "recall": 0, "repeat": 0, "passkey": 0}
    build_dataset(data, tmp_path)
    docs = pl.read_parquet(tmp_path / "documents.parquet")
    synthetic = docs.filter(pl.col("id").str.starts_with("synthetic/"))
    assert synthetic.height > 0 and set(synthetic["split"]) == {"train"}
    assert synthetic["id"].str.starts_with("synthetic/chars/").all()
    share = synthetic["tokens"].sum() / docs.filter(pl.col("split") == "train")["tokens"].sum()
    assert 0.25 < share < 0.4


def test_dataset_marks_exactly_the_answer_tokens(micro_raw, tmp_path):
    micro_raw["data"]["synthetic"] = {
        "fraction": 0.5,
        "size": 300,
        "mix": {"recall": 1, "repeat": 0, "passkey": 1},
    }
    build_dataset(validate_config(micro_raw)["data"], tmp_path)
    data = TokenData.load(tmp_path, "train")
    tokens, marked, _ = data.sample_batch(32, 257, seed=0, step=3)
    assert torch.equal(tokens, data.sample(32, 257, seed=0, step=3))
    decode = ByteTokenizer().decode
    answers = 0
    for row, mask in zip(tokens.tolist(), marked.tolist(), strict=True):
        edges = [i for i in range(1, len(row)) if mask[i] != mask[i - 1]]
        edges = edges[1:] if mask[0] else edges  # a window can start inside an answer
        for start, end in zip(edges[::2], edges[1::2], strict=False):  # runs inside the window
            value, before = decode(row[start:end]), decode(row[:start])
            assert re.fullmatch(r"\d+\.", value) and re.search(r"(is|=|it is) $", before), (
                before,
                value,
            )
            answers += 1
    assert answers > 10 and data.n_answer_tokens > 0
