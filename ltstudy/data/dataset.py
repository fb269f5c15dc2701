"""Token shards on disk: building them from a corpus, and sampling from them.

Layout of a data folder:
  manifest.json        tokenizer, splits, shard files with token counts and sha256
  documents.parquet    one row per document: id, split, shard, offset, tokens, sha256
  <split>-<k>.bin      token ids (uint16, or uint32 for vocabularies over 65,536; the
                       manifest's token_dtype), documents separated by the EOS token
  <split>-<k>.answers.npy  [n, 2] token spans [start, end) of the shard's marked answers
                       (recall and passkey documents; written only where there are any)

Documents go to train or validation by a hash of their id, so the split is stable when
documents are added or removed.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ltstudy.data.corpus import Document, iter_documents
from ltstudy.data.synthetic import synthetic_documents
from ltstudy.data.text import split_sentences, vocabulary
from ltstudy.data.tokenizer import get_tokenizer
from ltstudy.io import atomic_path, read_json, write_json

SPLITS = ("train", "validation")
SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard


def token_dtype(vocab_size: int) -> str:
    """The narrowest little-endian unsigned type that holds every token id."""
    return "<u2" if vocab_size <= 1 << 16 else "<u4"


def document_split(doc_id: str, validation_fraction: float, seed: int) -> str:
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "validation" if u < validation_fraction else "train"


class _ShardWriter:
    def __init__(self, out_dir: Path, split: str, dtype: str):
        self.out_dir, self.split, self.dtype = out_dir, split, dtype
        self.shards: list[dict[str, Any]] = []
        self._parts: list[np.ndarray] = []
        self._answers: list[tuple[int, int]] = []
        self._size = 0

    @property
    def position(self) -> tuple[int, int]:
        return len(self.shards), self._size

    def add(self, tokens: np.ndarray, answers: list[tuple[int, int]]) -> None:
        """Append a document's tokens; `answers` are token spans relative to its start."""
        if self._size and self._size + len(tokens) > SHARD_TOKENS:
            self.flush()
        self._answers += [(self._size + a, self._size + b) for a, b in answers]
        self._parts.append(tokens)
        self._size += len(tokens)

    def flush(self) -> None:
        if not self._size:
            return
        data = np.concatenate(self._parts).astype(self.dtype)
        name = f"{self.split}-{len(self.shards):05d}.bin"
        with atomic_path(self.out_dir / name) as tmp:
            data.tofile(tmp)
        shard = {
            "file": name,
            "tokens": len(data),
            "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
        }
        if self._answers:
            shard["answers"] = name.replace(".bin", ".answers.npy")
            with atomic_path(self.out_dir / shard["answers"]) as tmp, open(tmp, "wb") as f:
                np.save(f, np.asarray(self._answers, dtype=np.int64))
        self.shards.append(shard)
        self._parts, self._answers, self._size = [], [], 0


def encode_document(tokenizer, doc: Document) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of a document (the tokenizer's BOS first, if it has one, as transformers
    encodes a text; EOS appended) and the token spans of its marked answers.

    A document with answers is encoded piece by piece, cut at the answers' edges, so that each
    answer is exactly a run of tokens.
    """
    tokens = tokenizer.with_bos([])
    spans: list[tuple[int, int]] = []
    position = 0
    for start, end in sorted(doc.answers):
        tokens += tokenizer.encode(doc.text[position:start])
        answer = tokenizer.encode(doc.text[start:end])
        spans.append((len(tokens), len(tokens) + len(answer)))
        tokens += answer
        position = end
    tokens += [*tokenizer.encode(doc.text[position:]), tokenizer.eos_id]
    return tokens, spans


def build_dataset(data_cfg: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Tokenize the configured corpus into shards under out_dir; return the manifest."""
    import polars as pl

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = get_tokenizer(data_cfg["tokenizer"])
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _ShardWriter(out_dir, s, dtype) for s in SPLITS}
    rows: list[dict[str, Any]] = []
    total_bytes, train_bytes, started = 0, 0, time.time()
    samples: list[str] = []  # some training texts, for the synthetic documents' words and filler

    def add(doc: Document, split: str) -> None:
        raw = doc.text.encode("utf-8")
        ids, answers = encode_document(tokenizer, doc)
        tokens = np.asarray(ids, dtype=dtype)
        shard, offset = writers[split].position
        writers[split].add(tokens, answers)
        rows.append(
            {
                "id": doc.id,
                "split": split,
                "shard": shard,
                "offset": offset,
                "tokens": len(tokens),
                "sha256": hashlib.sha256(raw).hexdigest(),
            }
        )

    for doc in iter_documents(data_cfg["corpus"]):
        raw = doc.text.encode("utf-8")
        if not raw:
            continue
        split = document_split(doc.id, data_cfg["validation_fraction"], data_cfg["seed"])
        add(doc, split)
        if split == "train":
            train_bytes += len(raw)
            if len(samples) < 200:
                samples.append(doc.text)
        total_bytes += len(raw)
        if len(rows) % 1000 == 0:
            print(f"[data] {len(rows)} documents, {total_bytes / 1e6:.1f} MB", flush=True)
        if data_cfg.get("max_bytes") and total_bytes >= data_cfg["max_bytes"]:
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
            add(doc, "train")
            added += len(doc.text.encode("utf-8"))
            count += 1
        kinds = ", ".join(f"{k} {w}" for k, w in synthetic["mix"].items() if w)
        print(
            f"[data] added {count} synthetic documents ({kinds}) to the training split", flush=True
        )
    for w in writers.values():
        w.flush()
    for split in SPLITS:
        if not writers[split].shards:
            raise ValueError(
                f"corpus {data_cfg['corpus']!r} gave no {split} documents; use more documents "
                "or change data.validation_fraction"
            )
    schema = {
        "id": pl.String,
        "split": pl.String,
        "shard": pl.Int64,
        "offset": pl.Int64,
        "tokens": pl.Int64,
        "sha256": pl.String,
    }
    with atomic_path(out_dir / "documents.parquet") as tmp:
        pl.DataFrame(rows, schema=schema).write_parquet(tmp)
    manifest = {
        "data_config": dict(data_cfg),
        "tokenizer": data_cfg["tokenizer"],
        "vocab_size": tokenizer.vocab_size,
        "token_dtype": dtype,
        "eos_id": tokenizer.eos_id,
        "documents": len(rows),
        "bytes": total_bytes,
        "splits": {
            s: {
                "documents": sum(r["split"] == s for r in rows),
                "tokens": sum(sh["tokens"] for sh in writers[s].shards),
                "shards": writers[s].shards,
            }
            for s in SPLITS
        },
    }
    write_json(out_dir / "manifest.json", manifest)
    print(
        f"[data] done: {len(rows)} documents, {total_bytes / 1e6:.1f} MB, "
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
