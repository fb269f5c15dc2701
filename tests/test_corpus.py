"""User corpora: read errors name the file and line, invalid UTF-8 and binary files are caught,
tokenization streams in bounded memory and in pieces that tokenize as the whole text, max_bytes
cuts while reading, a failed build leaves no shards, and the corpus fingerprint follows edits."""

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

import ltstudy
from ltstudy.data.corpus import CorpusError, Document, corpus_fingerprint, local_documents
from ltstudy.data.dataset import build_dataset, encode_document, text_pieces
from ltstudy.data.tokenizer import ByteTokenizer, HFTokenizer

DATA = {
    "corpus": "embedded",
    "tokenizer": "bytes",
    "validation_fraction": 0.5,
    "max_bytes": None,
    "seed": 0,
}
LATIN1 = "café au lait\n".encode("latin-1")  # é is one byte 0xe9: not UTF-8


def small_corpus(root, n=12):
    """Short documents that land in both splits (validation_fraction 0.5)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": f"document {i} " * 20}) for i in range(n)]
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    return root


def build(root, tmp_path, **data):
    return build_dataset({**DATA, "corpus": str(root), **data}, tmp_path / "out")


def texts(out):
    """Each document's text, decoded from the bytes shards, by id."""
    docs = pl.read_parquet(out / "documents.parquet")
    found = {}
    for row in docs.iter_rows(named=True):
        data = (out / f"{row['split']}-{row['shard']:05d}.bin").read_bytes()
        ids = memoryview(data).cast("H")[row["offset"] : row["offset"] + row["tokens"] - 1]
        found[row["id"]] = bytes(ids.tolist()).decode("utf-8")
    return found


def test_invalid_utf8_in_jsonl_names_file_and_line(tmp_path):
    root = small_corpus(tmp_path / "c")
    (root / "b.jsonl").write_bytes(b'{"text": "fine"}\n\n{"text": "' + LATIN1[:-1] + b'"}\n')
    with pytest.raises(CorpusError, match=r"b\.jsonl:3: not valid UTF-8") as err:
        build(root, tmp_path)
    assert "\n" not in str(err.value)
    (root / "b.jsonl").write_text('{"text": "half a pair: \\ud800"}\n')  # JSON, not UTF-8
    with pytest.raises(CorpusError, match=r"b\.jsonl:1: not valid UTF-8"):
        build(root, tmp_path)


def test_a_text_that_is_not_a_string_names_file_and_line(tmp_path):
    root = small_corpus(tmp_path / "c")
    (root / "b.jsonl").write_text('{"text": "fine"}\n{"text": 42}\n')
    with pytest.raises(CorpusError, match=r"b\.jsonl:2: 'text' must be a string, not 42"):
        build(root, tmp_path)
    (root / "b.jsonl").write_text('{"text": null}\n')
    with pytest.raises(CorpusError, match=r"b\.jsonl:1: 'text' must be a string, not null"):
        list(local_documents(root))


def test_binary_files_are_rejected_by_name(tmp_path):
    root = small_corpus(tmp_path / "c")
    (root / "image.txt").write_bytes(random.Random(0).randbytes(200_000))
    with pytest.raises(CorpusError, match=r"image\.txt: a binary file"):
        build(root, tmp_path)
    for mode in ("replace", "skip_document"):  # binary is no text, whatever the mode
        with pytest.raises(CorpusError, match=r"image\.txt: a binary file"):
            list(local_documents(root, on_invalid_utf8=mode))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_invalid_utf8_is_an_error_replaced_or_skipped_as_configured(tmp_path, capsys, suffix):
    root = small_corpus(tmp_path / "c")
    good, bad = "naïve text\n".encode(), b"line one\n" + LATIN1
    if suffix == ".jsonl":  # one document per line: only the bad line is affected
        good = b'{"text": "naive"}\n'
        bad = good + b'{"text": "' + LATIN1.rstrip() + b'"}\n'
    (root / f"good{suffix}").write_bytes(good)
    (root / f"bad{suffix}").write_bytes(bad)
    bad_id = "bad.txt" if suffix == ".txt" else "bad.jsonl:2"

    with pytest.raises(CorpusError, match=rf"bad\{suffix}:2: not valid UTF-8"):
        build(root, tmp_path)
    assert not list((tmp_path / "out").rglob("*.bin"))

    build(root, tmp_path, on_invalid_utf8="replace")
    got = texts(tmp_path / "out")
    assert got[bad_id].endswith("caf\ufffd au lait" + "\n" * (suffix == ".txt"))

    capsys.readouterr()
    build(root, tmp_path, on_invalid_utf8="skip_document")
    got = texts(tmp_path / "out")
    assert bad_id not in got and any(i.startswith("good") for i in got)
    assert f"skipped {root / f'bad{suffix}'}:2: not valid UTF-8" in capsys.readouterr().out


def test_a_file_gone_while_reading_is_named(tmp_path):
    root = small_corpus(tmp_path / "c")
    (root / "b.txt").write_text("a document")
    documents = local_documents(root)
    next(documents)
    (root / "b.txt").unlink()
    with pytest.raises(CorpusError, match=r"b\.txt: cannot read \(No such file or directory\)"):
        list(documents)


def test_parquet_errors_name_the_file(tmp_path):
    root = small_corpus(tmp_path / "c")
    pl.DataFrame({"text": [1, 2]}).write_parquet(root / "numbers.parquet")
    with pytest.raises(CorpusError, match=r"numbers\.parquet: column 'text' is int64, not str"):
        build(root, tmp_path)
    (root / "numbers.parquet").unlink()
    pl.DataFrame({"text": ["some text " * 100] * 50}).write_parquet(root / "cut.parquet")
    data = (root / "cut.parquet").read_bytes()
    (root / "cut.parquet").write_bytes(data[: len(data) // 2])  # a copy that was cut short
    with pytest.raises(CorpusError, match=r"cut\.parquet: not a readable Parquet file \("):
        build(root, tmp_path)


def test_a_failed_build_leaves_no_shards(tmp_path):
    root = small_corpus(tmp_path / "c", n=400)
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)  # the data job's log lives in out_dir too
    (out / "logs" / "data.log").write_text("log\n")
    (out / ".staging").mkdir()  # left by a build that was killed
    (out / ".staging" / "train-00000.bin").write_bytes(b"\0" * 100)
    (root / "z.jsonl").write_text('{"text": "fine"}\n{"text": [1]}\n')  # read last, fails
    with pytest.raises(CorpusError, match=r"z\.jsonl:2"):
        build(root, tmp_path)
    assert not list(out.rglob("*.bin")) and not (out / "documents.parquet").exists()
    assert sorted(p.name for p in out.iterdir()) == ["logs"]
    only = tmp_path / "only.txt"  # one document: no validation split, found after tokenizing
    only.write_text("one document " * 100_000)
    with pytest.raises(ValueError, match="gave no validation documents"):
        build(only, tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["logs"]
    (root / "z.jsonl").unlink()
    manifest = build(root, tmp_path)
    assert manifest["documents"] == 400 and not (out / ".staging").exists()
    assert (out / "manifest.json").exists() and (out / "logs" / "data.log").exists()


def test_max_bytes_cuts_a_long_document_while_reading(tmp_path, capsys):
    root = small_corpus(tmp_path / "c")
    (root / "b.txt").write_text("é" * 100_000)  # 200,000 bytes of two-byte characters
    (root / "c.txt").write_bytes(b"\0binary, never read: reading stopped after b.txt")
    manifest = build(root, tmp_path, max_bytes=100_001)
    got = texts(tmp_path / "out")
    assert got["b.txt"] == "é" * 50_000  # cut at the last whole character within 100,001
    assert "c.txt" not in got and manifest["bytes"] == sum(len(t.encode()) for t in got.values())
    assert "b.txt: cut at data.max_bytes (100,001 bytes)" in capsys.readouterr().out


def _words(seed: int, n: int) -> str:
    """Text with the spacing byte-level pre-tokenizers treat specially: runs of spaces and
    newlines, newlines after spaces, digits, punctuation, multi-byte characters."""
    rng = random.Random(seed)
    parts = ["the", "cat", "sat", "naïve", "日本語", "12345", "3.14", "x", "—", "'s", "'ll"]
    seps = [" ", " ", " ", " ", "  ", "\n", "\n\n", " \n", "\n ", ". ", ", ", "\t", "\r\n", "!\n"]
    return "".join(rng.choice(parts) + rng.choice(seps) for _ in range(n))


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_level_bpe(folder, pre_tokenizer: str) -> HFTokenizer:
    """A tiny BPE tokenizer with GPT-2's byte-level pre-tokenizer, or Llama-3's split regex."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    if pre_tokenizer == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        split = pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_words(1, 2000)], trainer)
    tok.save(str(folder / "tokenizer.json"))
    return HFTokenizer(folder)


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2", "llama3"])
def test_pieces_tokenize_as_the_whole_text(tmp_path, monkeypatch, tokenizer):
    # small pieces (64 characters, read 64 bytes at a time: characters span reads), many cuts
    monkeypatch.setattr("ltstudy.data.dataset.CHUNK", 64)
    monkeypatch.setattr("ltstudy.data.corpus.CHUNK", 64)
    tok = ByteTokenizer() if tokenizer == "bytes" else byte_level_bpe(tmp_path, tokenizer)
    text = _words(2, 3000)
    pieces = list(text_pieces([text[i : i + 64] for i in range(0, len(text), 64)]))
    assert "".join(pieces) == text and len(pieces) > len(text) / 200
    if tokenizer != "bytes":  # the same words for BPE, whatever merges the vocabulary has
        words = tok._tok.pre_tokenizer.pre_tokenize_str
        assert [w for p in pieces for w, _ in words(p)] == [w for w, _ in words(text)]
    whole = [*tok.with_bos(tok.encode(text)), tok.eos_id]
    assert encode_document(tok, Document("held", text))[0] == whole
    (tmp_path / "doc.txt").write_text(text, newline="")
    (doc,) = local_documents(tmp_path / "doc.txt")
    assert encode_document(tok, doc)[0] == whole


def test_memory_does_not_grow_with_the_file(tmp_path):
    """Peak RSS of a build from a single-line .txt of 40 MB and of 80 MB, each in a fresh
    process: the old build held the text, its token list and the shard (~18x the file)."""
    script = textwrap.dedent(
        """
        import sys
        from ltstudy.data.dataset import build_dataset
        build_dataset({"corpus": sys.argv[1], "tokenizer": "bytes", "validation_fraction": 0.5,
                       "max_bytes": None, "seed": 0}, sys.argv[2])
        hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
        print(int(hwm.split()[1]) // 1024)
        """
    )
    peaks = {}
    for mb in (40, 80):
        root = small_corpus(tmp_path / f"c{mb}")
        line = ("some words and more words " * 40_000)[:1_000_000]
        with open(root / "big.txt", "w") as f:  # one line of words
            for _ in range(mb):
                f.write(line)
        run = subprocess.run(
            [sys.executable, "-c", script, str(root), str(tmp_path / f"out{mb}")],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(Path(ltstudy.__file__).parents[1])},
        )
        peaks[mb] = int(run.stdout.split()[-1])
    print(f"peak RSS: 40 MB file {peaks[40]} MB, 80 MB file {peaks[80]} MB")
    assert peaks[80] - peaks[40] < 100, peaks


def test_fingerprint_follows_the_corpus_files(tmp_path):
    root = small_corpus(tmp_path / "c")
    (root / "notes.md").write_text("not a corpus file")
    before = corpus_fingerprint(str(root))
    assert corpus_fingerprint(str(root)) == before and len(before) == 16
    corpus_fingerprint.cache_clear()
    (root / "notes.md").write_text("edited, but still not a corpus file")
    assert corpus_fingerprint(str(root)) == before

    corpus_fingerprint.cache_clear()
    doc = root / "a.jsonl"
    stat = doc.stat()
    doc.write_text(doc.read_text().replace("document 1 ", "Document 1 "))  # same size
    os.utime(doc, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    edited = corpus_fingerprint(str(root))
    assert edited != before

    corpus_fingerprint.cache_clear()
    (root / "sub").mkdir()
    (root / "sub" / "more.txt").write_text("another document")
    assert corpus_fingerprint(str(root)) not in (before, edited)
    assert corpus_fingerprint("embedded") == corpus_fingerprint("embedded")
    assert corpus_fingerprint("embedded") != corpus_fingerprint(str(root))
    with pytest.raises(CorpusError, match=r"no \.txt"):
        corpus_fingerprint(str(tmp_path / "missing"))


def test_content_fingerprint_follows_edits_not_times(tmp_path):
    """`data.fingerprint: content`: a copy with new times keeps the digest (no rebuild); an
    edit of the same size and time changes it, which `stat` cannot see."""
    root = small_corpus(tmp_path / "c")
    before = corpus_fingerprint(str(root), "content")
    corpus_fingerprint.cache_clear()
    doc = root / "a.jsonl"
    os.utime(doc, ns=(doc.stat().st_atime_ns, doc.stat().st_mtime_ns + 5_000_000_000))
    assert corpus_fingerprint(str(root), "content") == before
    assert corpus_fingerprint(str(root), "stat") != corpus_fingerprint(str(root), "content")

    stat = doc.stat()
    by_stat = corpus_fingerprint(str(root), "stat")
    corpus_fingerprint.cache_clear()
    doc.write_text(doc.read_text().replace("document 1 ", "Document 1 "))  # same size
    os.utime(doc, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same time
    assert corpus_fingerprint(str(root), "stat") == by_stat
    assert corpus_fingerprint(str(root), "content") != before
