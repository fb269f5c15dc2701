"""Byte-level tokenizer: every UTF-8 byte is a token, plus end-of-document and padding.

It needs no vocabulary file and no download, so the embedded corpus works on any machine.
"""

from __future__ import annotations

from collections.abc import Sequence


class ByteTokenizer:
    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


TOKENIZERS = {"bytes": ByteTokenizer}


def get_tokenizer(name: str) -> ByteTokenizer:
    if name not in TOKENIZERS:
        raise KeyError(f"unknown tokenizer {name!r} (known: {', '.join(TOKENIZERS)})")
    return TOKENIZERS[name]()


def tokenizer_vocab_size(name: str) -> int:
    return get_tokenizer(name).vocab_size
