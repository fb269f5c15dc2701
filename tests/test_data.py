"""Corpus building: deterministic shards, a clean document-level split, user corpora."""

import json

import numpy as np
import polars as pl
import pytest
import torch

from ltstudy.data.corpus import CorpusError, local_documents
from ltstudy.data.dataset import TokenData, build_dataset
from ltstudy.data.tokenizer import ByteTokenizer
from ltstudy.io import read_json

DATA = {
    "corpus": "embedded",
    "tokenizer": "bytes",
    "validation_fraction": 0.1,
    "max_bytes": 300_000,
    "seed": 0,
}


def test_embedded_corpus_is_deterministic_and_split_by_document(tmp_path):
    a, b = build_dataset(DATA, tmp_path / "a"), build_dataset(DATA, tmp_path / "b")
    assert a == b  # same shards, hashes and counts
    docs = pl.read_parquet(tmp_path / "a" / "documents.parquet")
    assert docs["id"].n_unique() == docs.height  # each document in exactly one split
    assert set(docs["split"]) == {"train", "validation"}
    for split in ("train", "validation"):
        part = docs.filter(pl.col("split") == split)
        assert part["tokens"].sum() == a["splits"][split]["tokens"]
    # document boundaries in the manifest point at real EOS-terminated spans
    row = docs.filter(pl.col("split") == "train").row(3, named=True)
    shard = TokenData.load(tmp_path / "a", "train").shards[row["shard"]]
    span = shard[row["offset"] : row["offset"] + row["tokens"]]
    assert span[-1] == ByteTokenizer.eos_id and ByteTokenizer.eos_id not in span[:-1]


def test_split_is_stable_when_the_corpus_changes(tmp_path):
    small = build_dataset({**DATA, "max_bytes": 150_000}, tmp_path / "s")
    build_dataset(DATA, tmp_path / "l")
    s = pl.read_parquet(tmp_path / "s" / "documents.parquet").select("id", "split")
    l = pl.read_parquet(tmp_path / "l" / "documents.parquet").select("id", "split")
    joined = s.join(l, on="id", suffix="_large")
    assert joined.height == small["documents"] and (joined["split"] == joined["split_large"]).all()


def test_sampling_is_a_function_of_seed_and_step(tmp_path):
    build_dataset(DATA, tmp_path)
    data = TokenData.load(tmp_path, "train")
    assert torch.equal(data.sample(4, 33, seed=1, step=5), data.sample(4, 33, seed=1, step=5))
    assert not torch.equal(data.sample(4, 33, seed=1, step=5), data.sample(4, 33, seed=1, step=6))
    assert data.sample(4, 33, seed=1, step=5).shape == (4, 33)


def test_aligned_windows_start_at_documents(tmp_path):
    build_dataset(DATA, tmp_path)
    data = TokenData.load(tmp_path, "train")
    windows = data.sample(16, 257, seed=1, step=2, windows="documents")
    assert torch.equal(windows, data.sample(16, 257, seed=1, step=2, windows="documents"))
    shard = torch.from_numpy(data.shards[0].astype("int64"))
    starts = set(data.document_starts[0].tolist())
    assert (
        starts and 0 in starts and all(shard[s - 1] == ByteTokenizer.eos_id for s in starts - {0})
    )
    for row in windows:  # each window is the text that follows one of the document starts
        assert any(torch.equal(row, shard[s : s + 257]) for s in starts)


def test_one_document_windows_hold_one_document_then_padding(tmp_path):
    synthetic = {"fraction": 0.5, "size": 120, "seed": 0, "mix": {"recall": 1, "passkey": 1}}
    build_dataset({**DATA, "synthetic": synthetic}, tmp_path)
    data = TokenData.load(tmp_path, "train")
    batch = data.sample_batch(64, 257, seed=3, step=1, windows="one_document")
    assert torch.equal(batch.tokens, data.sample(64, 257, 3, 1, windows="one_document"))
    eos = ByteTokenizer.eos_id
    shard = torch.from_numpy(data.shards[0].astype("int64"))
    starts = data.document_starts[0].tolist()
    ends = dict(zip(starts, [*starts[1:], len(shard)], strict=True))
    padded = 0
    for row, pad in zip(batch.tokens, batch.padding, strict=True):
        n = int((~pad).sum())  # the document's tokens come first, then only padding
        assert not pad[:n].any() and (row[n:] == eos).all()
        start = next(s for s in starts if torch.equal(row[:n], shard[s : s + n]))
        assert n == min(257, ends[start] - start)  # cut at the document's EOS or the window
        assert n == 257 or row[n - 1] == eos
        padded += n < 257
    assert padded > 10  # the short synthetic documents were padded
    assert not (batch.answers & batch.padding).any()


class WideVocabulary(ByteTokenizer):
    """Byte tokens shifted past 65,536, like Qwen3's 151,936-id vocabulary."""

    shift = 100_000
    vocab_size = ByteTokenizer.vocab_size + shift
    eos_id = ByteTokenizer.eos_id + shift

    def encode(self, text):
        return [t + self.shift for t in super().encode(text)]

    def encode_array(self, text):
        return super().encode_array(text).astype(np.int64) + self.shift


def test_vocabularies_over_uint16_are_stored_whole(tmp_path, monkeypatch):
    monkeypatch.setattr("ltstudy.data.dataset.get_tokenizer", lambda name: WideVocabulary())
    manifest = build_dataset(DATA, tmp_path)
    assert manifest["token_dtype"] == "<u4"
    data = TokenData.load(tmp_path, "train")
    tokens = data.sample(4, 65, seed=0, step=0)
    assert tokens.min() >= WideVocabulary.shift and tokens.max() < WideVocabulary.vocab_size
    assert (data.head(5000) == WideVocabulary.eos_id).any()


def test_user_corpus_of_txt_jsonl_and_parquet(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("first document " * 50)
    (root / "sub" / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": f"doc {i} " * 40}) for i in range(30))
    )
    pl.DataFrame(
        {"text": [f"row {i} " * 40 for i in range(20)], "other": list(range(20))}
    ).write_parquet(root / "c.parquet")
    (root / "ignored.md").write_text("not a corpus file")
    docs = list(local_documents(root))
    assert len(docs) == 1 + 30 + 20
    manifest = build_dataset(
        {**DATA, "corpus": str(root), "validation_fraction": 0.2}, tmp_path / "out"
    )
    assert manifest["documents"] == 51
    assert read_json(tmp_path / "out" / "manifest.json")["splits"]["validation"]["documents"] > 0


def test_bad_user_files_are_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2"):
        list(local_documents(tmp_path / "bad.jsonl"))
    pl.DataFrame({"body": ["x"]}).write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(CorpusError, match=r"bad\.parquet: no 'text' column"):
        list(local_documents(tmp_path / "bad.parquet"))
    with pytest.raises(CorpusError, match=r"no \.txt"):
        list(local_documents(_empty(tmp_path)))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_byte_tokenizer_array_path_gives_the_lists_ids():
    """The data stage's array path (a view of the UTF-8 bytes) against `encode`."""
    tok = ByteTokenizer()
    text = "plain, accentué, 日本語, emoji 🙂 and \x00 control"
    assert tok.encode_array(text).tolist() == tok.encode(text)
    assert tok.encode_array("").size == 0
