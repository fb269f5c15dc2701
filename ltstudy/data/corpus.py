"""Where documents come from: the embedded corpus or a user's local files.

The embedded corpus is built from text every Python installation already has: the
documentation topics in `pydoc_data` and the standard library's own source files. It needs no
download and is deterministic for a given Python version (the manifest records hashes).

A user's files are read as UTF-8 and checked as they are read: every error names the file (and
line), binary files are rejected, and invalid UTF-8 stops the build unless
`data.on_invalid_utf8` says to replace it or to skip the document. A .txt file is read in
chunks, so it can be larger than memory.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import platform
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".parquet")
ON_INVALID_UTF8 = ("error", "replace", "skip_document")
CHUNK = 1 << 20  # bytes read, and characters handed out, at a time
BINARY_PROBE = 8192  # a NUL byte in a file's first 8 KiB marks it binary (as git decides)
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's "\ud800" escapes: no UTF-8 for them


@dataclass(frozen=True)
class Document:
    """A text, held in `text` or read in chunks from a UTF-8 file at `path` (then `text` is
    empty); `answers` are character spans [start, end) of a held text that a model can only
    predict by recalling them from earlier in the text (marked in synthetic documents, for
    `train.answer_loss_weight`).
    """

    id: str
    text: str = ""
    answers: tuple[tuple[int, int], ...] = ()
    path: Path | None = None
    errors: str = "strict"  # how the file's invalid UTF-8 decodes: strict (an error) or replace

    def chunks(self) -> Iterator[str]:
        """The text in chunks of at most CHUNK characters; a file is read as they are taken."""
        if self.path is not None:
            yield from _decoded(self.path, self.errors)
            return
        for i in range(0, len(self.text), CHUNK):
            yield self.text[i : i + CHUNK]


class CorpusError(ValueError):
    """A user corpus that cannot be read; the message names the file (and line)."""


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


def _corpus_files(root: Path) -> list[Path]:
    files = _files(root)
    if not files:
        raise CorpusError(f"{root}: no {', '.join(SUFFIXES)} files found")
    return files


def _name(root: Path, path: Path) -> str:
    return path.name if root.is_file() else path.relative_to(root).as_posix()


def local_documents(root: str | Path, on_invalid_utf8: str = "error") -> Iterator[Document]:
    """Documents of a folder (or one file): .txt = one document, .jsonl = one per line with a
    `text` field, .parquet = one per row of its `text` column."""
    if on_invalid_utf8 not in ON_INVALID_UTF8:
        raise ValueError(f"on_invalid_utf8 must be one of {ON_INVALID_UTF8}")
    root = Path(root)
    for path in _corpus_files(root):
        rel = _name(root, path)
        try:
            if path.suffix == ".txt":
                yield from _txt_documents(path, rel, on_invalid_utf8)
            elif path.suffix == ".jsonl":
                yield from _jsonl_documents(path, rel, on_invalid_utf8)
            elif path.suffix == ".parquet":
                yield from _parquet_documents(path, rel, on_invalid_utf8)
            else:
                raise CorpusError(f"{path}: unsupported file type (use {', '.join(SUFFIXES)})")
        except OSError as err:
            raise _unreadable(path, err) from None


def _unreadable(path: Path, err: OSError) -> CorpusError:  # or gone since the listing
    return CorpusError(f"{path}: cannot read ({err.strerror or err})")


def _check_text_file(path: Path) -> None:
    with path.open("rb") as f:
        if b"\0" in f.read(BINARY_PROBE):
            raise CorpusError(f"{path}: a binary file (NUL bytes in its first 8 KiB), not text")


def _invalid(where: str, err: UnicodeError) -> CorpusError:
    return CorpusError(
        f"{where}: not valid UTF-8 ({err.reason}); data.on_invalid_utf8 can replace or skip it"
    )


def _skipping(err: CorpusError) -> None:
    print(f"[data] warning: skipped {err.args[0].split('; ')[0]}", flush=True)


def _decoded(path: Path, errors: str) -> Iterator[str]:
    """The text of a UTF-8 file, decoded a chunk at a time (a character may span two chunks);
    with errors="strict", invalid UTF-8 raises a CorpusError naming the file and line."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    lines = 0  # newlines before the chunk being decoded
    try:
        with path.open("rb") as f:
            while True:
                raw = f.read(CHUNK)
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as err:  # err.object: bytes held back, then `raw`
                    line = lines + err.object.count(b"\n", 0, err.start) + 1
                    raise _invalid(f"{path}:{line}", err) from None
                if text:
                    yield text
                if not raw:
                    return
                lines += raw.count(b"\n")
    except OSError as err:
        raise _unreadable(path, err) from None


def _txt_documents(path: Path, rel: str, on_invalid_utf8: str) -> Iterator[Document]:
    _check_text_file(path)
    if on_invalid_utf8 == "skip_document":  # check it all first: its tokens are not undone
        try:
            for _ in _decoded(path, "strict"):
                pass
        except CorpusError as err:
            _skipping(err)
            return
    yield Document(rel, path=path, errors="replace" if on_invalid_utf8 == "replace" else "strict")


def _text(raw: bytes, where: str, on_invalid_utf8: str) -> str | None:
    """`raw` decoded as on_invalid_utf8 says (None: skip it)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if on_invalid_utf8 == "replace":
            return raw.decode("utf-8", errors="replace")
        if on_invalid_utf8 == "error":
            raise _invalid(where, err) from None
        _skipping(_invalid(where, err))
        return None


def _jsonl_documents(path: Path, rel: str, on_invalid_utf8: str) -> Iterator[Document]:
    _check_text_file(path)
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path}:{line_no}"
            line = _text(raw, where, on_invalid_utf8)
            if line is None or not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CorpusError(f"{where}: expected a JSON object with a 'text' field") from None
            if not isinstance(text, str):
                raise CorpusError(f"{where}: 'text' must be a string, not {json.dumps(text)[:40]}")
            if _SURROGATE.search(text):  # an escaped half of a UTF-16 pair: not encodable
                raw_text = text.encode("utf-8", errors="surrogatepass")
                text = _text(raw_text, where, on_invalid_utf8)
                if text is None:
                    continue
            yield Document(f"{rel}:{line_no}", text)


def _parquet_documents(path: Path, rel: str, on_invalid_utf8: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
        if "text" not in names:
            raise CorpusError(f"{path}: no 'text' column (columns: {', '.join(names)})")
        kind = table.schema_arrow.field("text").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise CorpusError(f"{path}: column 'text' is {kind}, not string")
        row = 0
        for batch in table.iter_batches(batch_size=256, columns=["text"]):
            # as bytes: pyarrow does not check that a string column is UTF-8
            for raw in batch.column(0).cast(pa.large_binary()).to_pylist():
                text = "" if raw is None else _text(raw, f"{path}:row {row}", on_invalid_utf8)
                if text is not None:
                    yield Document(f"{rel}:{row}", text)
                row += 1
    except pa.ArrowException as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorpusError(f"{path}: not a readable Parquet file ({reason})") from None


def iter_documents(corpus: str, on_invalid_utf8: str = "error") -> Iterator[Document]:
    if corpus == "embedded":
        return embedded_documents()
    return local_documents(corpus, on_invalid_utf8)


@functools.cache
def corpus_fingerprint(corpus: str, method: str = "stat") -> str:
    """A short digest that changes when the corpus does, for the data id: the Python version for
    the embedded corpus (it is the standard library's text); for a local corpus each file's
    relative path with its size and modification time (`stat`: cheap, but a copy with new times
    rebuilds) or with a hash of its bytes (`content`: reads the whole corpus once per
    validation, but only an edit rebuilds)."""
    digest = hashlib.sha256()
    if corpus == "embedded":
        digest.update(f"embedded:{platform.python_version()}".encode())
        return digest.hexdigest()[:16]
    root = Path(corpus)
    for path in _corpus_files(root):
        if method == "content":
            summary = _content_hash(path)
        else:
            stat = path.stat()
            summary = f"{stat.st_size}\0{stat.st_mtime_ns}"
        digest.update(f"{_name(root, path)}\0{summary}\n".encode())
    return digest.hexdigest()[:16]


def _content_hash(path: Path, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read a block at a time (memory independent of its size)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()
