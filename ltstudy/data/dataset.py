"""Token shards on disk: building them from a corpus, and sampling from them.

Layout of a data folder:
  manifest.json        tokenizer, splits, shard files with token counts and sha256
  documents.parquet    one row per document: id, split, shard, offset, tokens, sha256
  <split>-<k>.bin      token ids (uint16, or uint32 for vocabularies over 65,536; the
                       manifest's token_dtype), documents separated by the EOS token
  <split>-<k>.answers.npy  [n, 2] token spans [start, end) of the shard's marked answers
                       (recall and passkey documents; written only where there are any)

Documents go to train or validation by a hash of their id, so the split is stable when
documents are added or removed. A build streams: documents are read, tokenized and written a
piece at a time, so its memory does not grow with the corpus or its largest file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ltstudy import progress
from ltstudy.data.corpus import CHUNK, Document, iter_documents
from ltstudy.data.synthetic import synthetic_documents
from ltstudy.data.text import split_sentences, vocabulary
from ltstudy.data.tokenizer import get_tokenizer
from ltstudy.io import read_json, write_json

SPLITS = ("train", "validation")
SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard
SAMPLE_CHARS = 1_000_000  # of each of the first training documents, for the synthetic ones
STAGING = ".staging"  # the folder under out_dir a build writes into until it succeeds
TABLE_ROWS = 1 << 16  # documents.parquet rows written at a time


def token_dtype(vocab_size: int) -> str:
    """The narrowest little-endian unsigned type that holds every token id."""
    return "<u2" if vocab_size <= 1 << 16 else "<u4"


def document_split(doc_id: str, validation_fraction: float, seed: int) -> str:
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "validation" if u < validation_fraction else "train"


_CUTS = (
    re.compile(r".*\S\n(?=\S)", re.DOTALL),  # ends after the last "\n" between non-spaces
    re.compile(r".*\S(?= )", re.DOTALL),  # ends before the last space after a non-space
)


def text_pieces(chunks: Iterable[str]) -> Iterator[str]:
    """The text `chunks` make up, in pieces of one to two CHUNKs of characters, cut only where
    byte-level BPE pre-tokenizers (GPT-2's, Llama-3's, Qwen's) split the whole text too, so
    the pieces' tokens joined are the text's tokens:

      after the last "\\n" that has a non-whitespace character on each side; failing that,
      before the last space that follows a non-whitespace character; failing that (no space
      in two CHUNKs), at the end, a hard cut.

    No pattern of those pre-tokenizers runs from a non-space into a space or from a "\\n" into
    a non-space, and a "\\n" after a non-space is its own token at a text's end too (after
    whitespace it is not: GPT-2's `\\s+(?!\\S)` groups "\\n\\n" differently at the end).
    Tokenizers that add a prefix space or a "▁" at a text's start may differ at the cuts,
    which only texts over a CHUNK have.
    """
    buffer = ""
    for chunk in chunks:
        buffer += chunk
        while len(buffer) > CHUNK:
            cut = next((m.end() for c in _CUTS if (m := c.match(buffer))), len(buffer))
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer


def _segments(doc: Document) -> Iterator[tuple[str, bool]]:
    """A document's text as (piece, is_answer) in order: each marked answer whole, so that it
    is exactly a run of tokens, and the text around them in `text_pieces`."""
    position = 0
    for start, end in sorted(doc.answers):
        for piece in text_pieces([doc.text[position:start]]):
            yield piece, False
        yield doc.text[start:end], True
        position = end
    for piece in text_pieces(doc.chunks() if not position else [doc.text[position:]]):
        yield piece, False


def _capped(doc: Document, max_bytes: int | None) -> Iterator[tuple[str, bool]]:
    """`_segments`, cut (at a character) after `max_bytes` bytes of UTF-8; reading stops there."""
    size = 0
    for piece, answer in _segments(doc):
        raw = piece.encode("utf-8")
        size += len(raw)
        if max_bytes is not None and size > max_bytes:
            yield raw[: len(raw) - (size - max_bytes)].decode("utf-8", errors="ignore"), answer
            print(f"[data] {doc.id}: cut at data.max_bytes ({max_bytes:,} bytes)", flush=True)
            return
        yield piece, answer


def document_tokens(
    tokenizer, doc: Document, max_bytes: int | None = None
) -> Iterator[tuple[str, np.ndarray, bool]]:
    """A document's token ids piece by piece, as (text, ids, is_answer): the tokenizer's BOS
    first (if it has one, as transformers encodes a text), the text's pieces (its first
    `max_bytes` bytes of UTF-8), EOS last; nothing for an empty document. Ids are arrays
    (`encode_array`: the byte tokenizer's are views of the text's bytes)."""
    pieces = _capped(doc, max_bytes)
    first = next(pieces, None)
    if first is None:
        return
    yield "", np.asarray(tokenizer.with_bos([]), dtype=np.int64), False
    for piece, answer in itertools.chain([first], pieces):
        yield piece, tokenizer.encode_array(piece), answer
    yield "", np.asarray([tokenizer.eos_id], dtype=np.int64), False


def encode_document(tokenizer, doc: Document) -> tuple[list[int], list[tuple[int, int]]]:
    """All of a document's token ids (`document_tokens`) and the token spans of its marked
    answers, as `build_dataset` writes them."""
    tokens: list[int] = []
    spans: list[tuple[int, int]] = []
    for _, ids, answer in document_tokens(tokenizer, doc):
        if answer:
            spans.append((len(tokens), len(tokens) + len(ids)))
        tokens += ids.tolist()
    return tokens, spans


class _ShardWriter:
    """A split's shard files, appended to and hashed as tokens arrive. A document is never
    split across shards: a shard ends with the document that fills it to SHARD_TOKENS."""

    def __init__(self, folder: Path, split: str, dtype: str):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._hash = hashlib.sha256()
        self._answers: list[tuple[int, int]] = []
        self._size = 0

    @property
    def position(self) -> tuple[int, int]:
        return len(self.shards), self._size

    @property
    def _name(self) -> str:
        return f"{self.split}-{len(self.shards):05d}.bin"

    def write(self, ids: np.ndarray, answer: bool = False) -> None:
        """Append token ids to the current document; `answer`: they are a marked answer."""
        if answer:
            self._answers.append((self._size, self._size + len(ids)))
        if len(ids) == 0:
            return
        if self._file is None:
            self._file = open(self.folder / self._name, "wb")  # noqa: SIM115 (until end_shard)
        data = np.asarray(ids, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._size += len(ids)

    def end_document(self) -> None:
        if self._size >= SHARD_TOKENS:
            self.end_shard()

    def end_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        name = self._name
        shard = {"file": name, "tokens": self._size, "sha256": self._hash.hexdigest()}
        if self._answers:
            shard["answers"] = name.replace(".bin", ".answers.npy")
            np.save(self.folder / shard["answers"], np.asarray(self._answers, dtype=np.int64))
        self.shards.append(shard)
        self._hash, self._answers, self._size = hashlib.sha256(), [], 0

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:  # a failed build: its folder is removed
            self._file.close()


class _DocumentTable:
    """documents.parquet, written TABLE_ROWS rows at a time."""

    def __init__(self, path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        text, count = pa.string(), pa.int64()
        columns = {"id": text, "split": text, "shard": count, "offset": count, "tokens": count}
        self.schema = pa.schema([*columns.items(), ("sha256", text)])
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self._rows: dict[str, list] = {name: [] for name in self.schema.names}
        self.documents = dict.fromkeys(SPLITS, 0)

    def add(self, **row: Any) -> None:
        for name, value in row.items():
            self._rows[name].append(value)
        self.documents[row["split"]] += 1
        if len(self._rows["id"]) >= TABLE_ROWS:
            self._write()

    def _write(self) -> None:
        import pyarrow as pa

        self._writer.write_table(pa.table(self._rows, schema=self.schema))
        self._rows = {name: [] for name in self.schema.names}

    def __enter__(self) -> _DocumentTable:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None and self._rows["id"]:
            self._write()
        self._writer.close()


def build_dataset(data_cfg: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Tokenize the configured corpus into shards under out_dir; return the manifest.

    The build writes into out_dir/.staging and moves its files in only when it succeeds, so a
    failed build leaves no shards (out_dir itself also holds the data job's logs)."""
    out_dir = Path(out_dir)
    staging = out_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # left by a build that was killed
    staging.mkdir(parents=True)
    try:
        manifest = _build(data_cfg, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (out_dir / "manifest.json").unlink(missing_ok=True)  # none that names other shards meanwhile
    for path in staging.iterdir():
        path.replace(out_dir / path.name)
    staging.rmdir()
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def _build(data_cfg: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    tokenizer = get_tokenizer(data_cfg["tokenizer"])
    dtype = token_dtype(tokenizer.vocab_size)
    total_bytes, train_bytes, started = 0, 0, time.time()
    samples: list[str] = []  # some training texts, for the synthetic documents' words and filler
    with contextlib.ExitStack() as stack:
        writers = {s: stack.enter_context(_ShardWriter(folder, s, dtype)) for s in SPLITS}
        table = stack.enter_context(_DocumentTable(folder / "documents.parquet"))

        def add(doc: Document, split: str, max_bytes: int | None = None) -> tuple[int, str]:
            """Write a document's tokens to `split`; its UTF-8 size (0: empty, left out) and
            first SAMPLE_CHARS characters."""
            writer = writers[split]
            shard, offset = writer.position
            digest, size, head = hashlib.sha256(), 0, ""
            for text, ids, answer in document_tokens(tokenizer, doc, max_bytes):
                raw = text.encode("utf-8")
                digest.update(raw)
                size += len(raw)
                if len(head) < SAMPLE_CHARS:
                    head += text[: SAMPLE_CHARS - len(head)]
                writer.write(ids, answer)
            if writer.position == (shard, offset):
                return 0, ""
            tokens = writer.position[1] - offset
            writer.end_document()
            table.add(
                id=doc.id,
                split=split,
                shard=shard,
                offset=offset,
                tokens=tokens,
                sha256=digest.hexdigest(),
            )
            return size, head

        max_bytes = data_cfg.get("max_bytes")
        for doc in iter_documents(data_cfg["corpus"], data_cfg.get("on_invalid_utf8", "error")):
            split = document_split(doc.id, data_cfg["validation_fraction"], data_cfg["seed"])
            size, head = add(doc, split, max_bytes)
            if not size:
                continue
            if split == "train":
                train_bytes += size
                if len(samples) < 200:
                    samples.append(head)
            total_bytes += size
            documents = sum(table.documents.values())
            progress.update(documents, None, "documents")
            if documents % 1000 == 0:
                print(f"[data] {documents} documents, {total_bytes / 1e6:.1f} MB", flush=True)
            if max_bytes and total_bytes >= max_bytes:
                break
        synthetic = data_cfg.get("synthetic") or {}
        if synthetic.get("fraction"):
            target = synthetic["fraction"] / (1 - synthetic["fraction"]) * train_bytes
            count, added = 0, 0
            for doc in synthetic_documents(
                synthetic["seed"],
                vocabulary(samples)[:2000],
                split_sentences(samples),
                synthetic["size"],
                synthetic["mix"],
            ):
                if added >= target:  # the fraction holds in bytes, whatever the documents' lengths
                    break
                added += add(doc, "train")[0]
                count += 1
            kinds = ", ".join(f"{k} {w}" for k, w in synthetic["mix"].items() if w)
            print(
                f"[data] added {count} synthetic documents ({kinds}) to the training split",
                flush=True,
            )
        for w in writers.values():
            w.end_shard()
    for split in SPLITS:
        if not writers[split].shards:
            raise ValueError(
                f"corpus {data_cfg['corpus']!r} gave no {split} documents; use more documents "
                "or change data.validation_fraction"
            )
    manifest = {
        "data_config": dict(data_cfg),
        "tokenizer": data_cfg["tokenizer"],
        "vocab_size": tokenizer.vocab_size,
        "token_dtype": dtype,
        "eos_id": tokenizer.eos_id,
        "documents": sum(table.documents.values()),
        "bytes": total_bytes,
        "splits": {
            s: {
                "documents": table.documents[s],
                "tokens": sum(sh["tokens"] for sh in writers[s].shards),
                "shards": writers[s].shards,
            }
            for s in SPLITS
        },
    }
    print(
        f"[data] done: {manifest['documents']} documents, {total_bytes / 1e6:.1f} MB, "
        f"train {manifest['splits']['train']['tokens']:,} / validation "
        f"{manifest['splits']['validation']['tokens']:,} tokens in {time.time() - started:.1f}s",
        flush=True,
    )
    return manifest


WINDOWS = ("random", "documents", "one_document")


class Batch(NamedTuple):
    """Training windows with two masks of the same shape."""

    tokens: Any  # [batch, length] int64 token ids
    answers: Any  # bool: marked answer tokens
    padding: Any  # bool: EOS filling the window after its document (windows="one_document")


@dataclass
class TokenData:
    """Memory-mapped shards of one split, with each shard's marked answer spans and (loaded on
    first use) document starts."""

    shards: list[np.ndarray]
    answers: list[np.ndarray]  # per shard: [n, 2] token spans [start, end), in order
    data_dir: Path
    split: str
    eos_id: int

    @classmethod
    def load(cls, data_dir: str | Path, split: str) -> TokenData:
        data_dir = Path(data_dir)
        manifest = read_json(data_dir / "manifest.json")
        entries = manifest["splits"][split]["shards"]
        dtype = manifest.get("token_dtype", "<u2")  # folders built before it was recorded
        shards = [np.memmap(data_dir / s["file"], dtype=dtype, mode="r") for s in entries]
        answers = [
            np.load(data_dir / s["answers"]) if "answers" in s else np.zeros((0, 2), np.int64)
            for s in entries
        ]
        return cls(shards, answers, data_dir, split, manifest["eos_id"])

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    @property
    def n_answer_tokens(self) -> int:
        return int(sum((a[:, 1] - a[:, 0]).sum() for a in self.answers))

    @functools.cached_property
    def document_starts(self) -> list[np.ndarray]:
        """Per shard, the token offsets where documents begin, in order."""
        import polars as pl

        docs = pl.read_parquet(
            self.data_dir / "documents.parquet", columns=["split", "shard", "offset"]
        )
        docs = docs.filter(pl.col("split") == self.split)
        return [
            np.sort(docs.filter(pl.col("shard") == k)["offset"].to_numpy())
            for k in range(len(self.shards))
        ]

    def sample(self, batch_size: int, length: int, seed: int, step: int, windows: str = "random"):
        """The token ids of `sample_batch`."""
        return self.sample_batch(batch_size, length, seed, step, windows).tokens

    def sample_batch(
        self,
        batch_size: int,
        length: int,
        seed: int,
        step: int,
        windows: str = "random",
        rows: slice | None = None,
    ) -> Batch:
        """`batch_size` windows of `length` tokens, a pure function of (seed, step). Windows
        start at a random token ("random") or at a random document's first token
        ("documents"); "one_document" also ends them at that document's EOS and fills the
        rest with EOS, marked as padding, so a window holds one document and nothing else.
        `rows` reads only those windows of the batch (a data-parallel rank's share); which
        windows the batch holds does not depend on it."""
        import torch

        if windows not in WINDOWS:
            raise ValueError(f"windows must be one of {WINDOWS}, not {windows!r}")
        rng = np.random.default_rng([seed, step])
        picked = self._windows(batch_size, length, rng, windows)[rows or slice(None)]
        tokens, answers, padding = [], [], []
        for shard, start, end in picked:
            row = np.full(length, self.eos_id, dtype=np.int64)
            row[: end - start] = self.shards[shard][start:end]
            tokens.append(row)
            answers.append(self._answer_mask(shard, start, end - start, length))
            padding.append(np.arange(length) >= end - start)
        return Batch(*(torch.from_numpy(np.stack(x)) for x in (tokens, answers, padding)))

    def _windows(
        self, batch_size: int, length: int, rng: np.random.Generator, windows: str
    ) -> list[tuple[int, int, int]]:
        """(shard, start, end) of each window, uniform over the possible starts."""
        if windows == "random":
            starts = None
            counts = np.array([max(0, len(s) - length) for s in self.shards], dtype=np.float64)
        else:  # document starts; "documents" needs a full window of tokens after the start
            room = 0 if windows == "one_document" else length
            starts = [  # a view of the sorted starts, not a per-step copy
                s[: np.searchsorted(s, len(shard) - room, side="right")]
                for s, shard in zip(self.document_starts, self.shards, strict=True)
            ]
            counts = np.array([len(s) for s in starts], dtype=np.float64)
        if not counts.sum():
            raise ValueError(
                f"no shard has room for a {length}-token window ({windows} windows); "
                "the corpus is too small"
            )
        picks = rng.choice(len(counts), size=batch_size, p=counts / counts.sum())
        out = []
        for k in picks:
            i = int(rng.integers(0, counts[k]))
            start = i if starts is None else int(starts[k][i])
            end = start + length
            if windows == "one_document":  # end at the next document's start
                doc_starts = self.document_starts[k]
                i_next = np.searchsorted(doc_starts, start, side="right")
                doc_end = doc_starts[i_next] if i_next < len(doc_starts) else len(self.shards[k])
                end = min(end, int(doc_end))
            out.append((int(k), start, end))
        return out

    def _answer_mask(self, shard: int, start: int, n: int, length: int) -> np.ndarray:
        """Marked answer tokens among the window's first `n` tokens, in a mask of `length`."""
        spans, mask = self.answers[shard], np.zeros(length, dtype=bool)
        first = np.searchsorted(spans[:, 1], start, side="right")  # first span ending inside
        last = np.searchsorted(spans[:, 0], start + n)  # spans starting before the end
        for a, b in spans[first:last]:
            mask[max(a - start, 0) : min(b - start, n)] = True
        return mask

    def head(self, n_tokens: int):
        """The first n_tokens of the split (across shards), as a 1-D tensor."""
        import torch

        out, need = [], n_tokens
        for shard in self.shards:
            take = shard[:need]
            out.append(np.asarray(take, dtype=np.int64))
            need -= len(take)
            if need <= 0:
                break
        return torch.from_numpy(np.concatenate(out))


def document_texts(
    data_dir: str | Path, split: str, tokenizer, max_documents: int | None = None
) -> list[str]:
    """The texts of a split's documents, decoded from the shards (for haystacks)."""
    import polars as pl

    data_dir = Path(data_dir)
    docs = pl.read_parquet(data_dir / "documents.parquet").filter(pl.col("split") == split)
    if max_documents is not None:
        docs = docs.head(max_documents)
    shards = TokenData.load(data_dir, split).shards
    return [
        tokenizer.decode(
            shards[row["shard"]][row["offset"] : row["offset"] + row["tokens"] - 1].tolist()
        )
        for row in docs.iter_rows(named=True)
    ]
