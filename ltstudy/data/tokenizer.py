"""Tokenizers: bytes (the default; no vocabulary file, no download) or a local Hugging Face
tokenizer folder (tokenizer.json), as needed to continue training a pretrained checkpoint."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path


class ByteTokenizer:
    """Every UTF-8 byte is a token, plus end-of-document and padding."""

    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer.json folder (e.g. the one shipped with a Qwen3 or Llama checkpoint)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json")
        self._tok = Tokenizer.from_file(str(file))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos(file.parent)

    def _find_eos(self, folder: Path) -> int:
        config = folder / "tokenizer_config.json"
        if config.is_file():
            eos = json.loads(config.read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if eos and self._tok.token_to_id(eos) is not None:
                return self._tok.token_to_id(eos)
        for name in ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"):
            if self._tok.token_to_id(name) is not None:
                return self._tok.token_to_id(name)
        raise ValueError(f"{folder}: cannot tell the end-of-document token")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


@cache
def get_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """'bytes' or the path of a Hugging Face tokenizer folder."""
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)


def tokenizer_vocab_size(name: str) -> int:
    return get_tokenizer(name).vocab_size
