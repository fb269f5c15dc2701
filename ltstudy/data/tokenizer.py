"""Tokenizers: bytes (the default; no vocabulary file, no download) or a local Hugging Face
tokenizer folder (tokenizer.json), as needed to continue training a pretrained checkpoint.

Both share one API. `encode(text)` gives a piece's ids without special tokens, so pieces can be
joined; `bos_id` is the token transformers puts at the start of a text (Llama-3's
<|begin_of_text|>; None for bytes and Qwen3). A caller that builds a prompt or a document from
pieces puts `with_bos(ids)` around the whole, once; `encode(text, add_special_tokens=True)` is
what transformers' `tokenizer(text)["input_ids"]` gives for a whole text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np


class ByteTokenizer:
    """Every UTF-8 byte is a token, plus end-of-document and padding."""

    bos_id = None
    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an array, without a Python int per byte (the data stage's path: a view
        of the UTF-8 bytes, about 100 times faster than building the list)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def with_bos(self, ids: Sequence[int]) -> list[int]:
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _token(config: dict, key: str) -> str | None:
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """A tokenizer.json folder (e.g. the one shipped with a Qwen3 or Llama checkpoint).

    Special tokens are those of tokenizer.json's post-processor (Llama-3's puts
    <|begin_of_text|> first, Qwen3's adds none), as in transformers 5, which ignores
    tokenizer_config.json's `add_bos_token` / `add_eos_token` when a tokenizer.json exists.
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json")
        self._tok = Tokenizer.from_file(str(file))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config_file = file.parent / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.eos_id = self._find_eos(config, file.parent)
        self.bos_id = self._leading_special(file)

    def _find_eos(self, config: dict, folder: Path) -> int:
        eos = _token(config, "eos_token")
        if eos and self._tok.token_to_id(eos) is not None:
            return self._tok.token_to_id(eos)
        for name in ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"):
            if self._tok.token_to_id(name) is not None:
                return self._tok.token_to_id(name)
        raise ValueError(f"{folder}: cannot tell the end-of-document token")

    def _leading_special(self, file: Path) -> int | None:
        """The token the post-processor puts before a text, if any."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        start = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
        if start > 1:
            raise ValueError(f"{file}: the post-processor puts {start} tokens before a text")
        return full[0] if start else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`; with special tokens as transformers adds them to a whole text."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def with_bos(self, ids: Sequence[int]) -> list[int]:
        """`ids` with the BOS token transformers starts a text with, if there is one."""
        return list(ids) if self.bos_id is None else [self.bos_id, *ids]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


@cache
def get_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """'bytes' or the path of a Hugging Face tokenizer folder."""
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)


def tokenizer_vocab_size(name: str) -> int:
    return get_tokenizer(name).vocab_size
