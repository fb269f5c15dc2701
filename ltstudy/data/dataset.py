"""Token shards on disk: building them from a corpus, and sampling from them.

Layout of a data folder:
  manifest.json        tokenizer, splits, shard files with token counts and sha256
  documents.parquet    one row per document: id, split, shard, offset, tokens, sha256
  <split>-<k>.bin      uint16 token ids, documents separated by the EOS token

Documents go to train or validation by a hash of their id, so the split is stable when
documents are added or removed.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ltstudy.data.corpus import Document, iter_documents
from ltstudy.data.synthetic import synthetic_documents
from ltstudy.data.text import split_sentences, vocabulary
from ltstudy.data.tokenizer import get_tokenizer
from ltstudy.io import atomic_path, read_json, write_json

SPLITS = ("train", "validation")
SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard


def document_split(doc_id: str, validation_fraction: float, seed: int) -> str:
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "validation" if u < validation_fraction else "train"


class _ShardWriter:
    def __init__(self, out_dir: Path, split: str):
        self.out_dir, self.split = out_dir, split
        self.shards: list[dict[str, Any]] = []
        self._parts: list[np.ndarray] = []
        self._size = 0

    @property
    def position(self) -> tuple[int, int]:
        return len(self.shards), self._size

    def add(self, tokens: np.ndarray) -> None:
        if self._size and self._size + len(tokens) > SHARD_TOKENS:
            self.flush()
        self._parts.append(tokens)
        self._size += len(tokens)

    def flush(self) -> None:
        if not self._size:
            return
        data = np.concatenate(self._parts).astype("<u2")
        name = f"{self.split}-{len(self.shards):05d}.bin"
        with atomic_path(self.out_dir / name) as tmp:
            data.tofile(tmp)
        self.shards.append(
            {
                "file": name,
                "tokens": len(data),
                "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
            }
        )
        self._parts, self._size = [], 0


def build_dataset(data_cfg: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Tokenize the configured corpus into shards under out_dir; return the manifest."""
    import polars as pl

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = get_tokenizer(data_cfg["tokenizer"])
    writers = {s: _ShardWriter(out_dir, s) for s in SPLITS}
    rows: list[dict[str, Any]] = []
    total_bytes, train_bytes, started = 0, 0, time.time()
    samples: list[str] = []  # some training texts, for the synthetic documents' words and filler

    def add(doc: Document, split: str) -> None:
        raw = doc.text.encode("utf-8")
        tokens = np.asarray([*tokenizer.encode(doc.text), tokenizer.eos_id], dtype=np.uint16)
        shard, offset = writers[split].position
        writers[split].add(tokens)
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
        share = synthetic["fraction"] / (1 - synthetic["fraction"])
        count = math.ceil(share * train_bytes / synthetic["size"])
        for doc in synthetic_documents(
            count,
            synthetic["seed"],
            vocabulary(samples)[:2000],
            split_sentences(samples),
            synthetic["size"],
            synthetic["mix"],
        ):
            add(doc, "train")
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


@dataclass
class TokenData:
    """Memory-mapped shards of one split."""

    shards: list[np.ndarray]

    @classmethod
    def load(cls, data_dir: str | Path, split: str) -> TokenData:
        data_dir = Path(data_dir)
        manifest = read_json(data_dir / "manifest.json")
        shards = [
            np.memmap(data_dir / s["file"], dtype="<u2", mode="r")
            for s in manifest["splits"][split]["shards"]
        ]
        return cls(shards)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    def sample(self, batch_size: int, length: int, seed: int, step: int):
        """`batch_size` random windows of `length` tokens; a pure function of (seed, step)."""
        import torch

        usable = [i for i, s in enumerate(self.shards) if len(s) > length]
        if not usable:
            raise ValueError(f"no shard holds more than {length} tokens; the corpus is too small")
        rng = np.random.default_rng([seed, step])
        weights = np.array([len(self.shards[i]) - length for i in usable], dtype=np.float64)
        picks = rng.choice(len(usable), size=batch_size, p=weights / weights.sum())
        rows = []
        for k in picks:
            shard = self.shards[usable[k]]
            start = int(rng.integers(0, len(shard) - length))
            rows.append(np.asarray(shard[start : start + length], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))

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
