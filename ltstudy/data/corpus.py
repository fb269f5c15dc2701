"""Where documents come from: the embedded corpus or a user's local files.

The embedded corpus is built from text every Python installation already has: the
documentation topics in `pydoc_data` and the standard library's own source files. It needs no
download and is deterministic for a given Python version (the manifest records hashes).
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Document:
    """A text; `answers` are character spans [start, end) a model can only predict by recalling
    them from earlier in the text (marked in synthetic documents, for `train.answer_loss_weight`).
    """

    id: str
    text: str
    answers: tuple[tuple[int, int], ...] = ()


class CorpusError(ValueError):
    """A user corpus that cannot be read; the message names the file."""


def embedded_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield Document(f"pydoc/{key}", topics[key])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        yield Document(f"stdlib/{path.name}", path.read_text(encoding="utf-8", errors="replace"))


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES)


def local_documents(root: str | Path) -> Iterator[Document]:
    """Documents of a folder (or one file): .txt = one document, .jsonl = one per line with a
    `text` field, .parquet = one per row of its `text` column."""
    root = Path(root)
    files = _files(root)
    if not files:
        raise CorpusError(f"{root}: no {', '.join(SUFFIXES)} files found")
    for path in files:
        rel = path.name if root.is_file() else str(path.relative_to(root))
        if path.suffix == ".txt":
            yield Document(rel, path.read_text(encoding="utf-8", errors="replace"))
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path, rel)
        elif path.suffix == ".parquet":
            yield from _parquet_documents(path, rel)
        else:
            raise CorpusError(f"{path}: unsupported file type (use {', '.join(SUFFIXES)})")


def _jsonl_documents(path: Path, rel: str) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CorpusError(
                    f"{path}:{line_no}: expected a JSON object with a 'text' field"
                ) from None
            yield Document(f"{rel}:{line_no}", text)


def _parquet_documents(path: Path, rel: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if "text" not in table.schema_arrow.names:
        raise CorpusError(
            f"{path}: no 'text' column (columns: {', '.join(table.schema_arrow.names)})"
        )
    row = 0
    for batch in table.iter_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            yield Document(f"{rel}:{row}", text or "")
            row += 1


def iter_documents(corpus: str) -> Iterator[Document]:
    return embedded_documents() if corpus == "embedded" else local_documents(corpus)
