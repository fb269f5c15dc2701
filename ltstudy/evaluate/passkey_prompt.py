"""Passkey prompts in the Landmark-attention format, sized to a token length.

As epfml/landmark-attention's `run_test.py` builds them: the instruction, filler ("The grass is
green. ..."), the passkey line, more filler and the question, joined with "\\n". Here the filler
is whole sentences, the needle sits between them at a relative depth, and the number of
sentences is the largest whose prompt fits in `length` tokens. Torch-free, so the config check
can size prompts too.

Each prompt also reports its needle distance: how many tokens back from the prompt's last token
the needle's last token lies. A model whose attention reaches fewer tokens back than that (a
sliding window) cannot see the key directly.
"""

from __future__ import annotations

import re

from ltstudy.evaluate.ruler import NOISE, largest_prompt

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
SENTENCES = [s + "." for s in NOISE.removesuffix(".").split(". ")]
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def filler(n: int) -> str:
    """The first n filler sentences, " "-joined (Landmark's repeated grass text)."""
    return " ".join(SENTENCES[i % len(SENTENCES)] for i in range(n))


def passkey_text(sentences: int, depth: float, key: int) -> tuple[str, str]:
    """The prompt text with `sentences` filler sentences, the needle after round(depth * n) of
    them, and the text up to the needle's end."""
    before = round(depth * sentences)
    head = "\n".join([INSTRUCTION, filler(before), NEEDLE.format(key=key)])
    return "\n".join([head, filler(sentences - before), QUESTION]), head


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[list[int], int]:
    """Token ids of a prompt of at most `length` tokens with the needle at relative `depth`,
    and the needle distance (tokens from the needle's last token to the prompt's last)."""

    def encode(text: str) -> list[int]:
        return tokenizer.with_bos(tokenizer.encode(text))

    try:
        ids, n = largest_prompt(encode, length, lambda n: passkey_text(n, depth, key)[0], 0, 10**7)
    except ValueError:
        raise ValueError(
            f"passkey length {length} is shorter than the bare prompt "
            f"({len(encode(passkey_text(0, depth, key)[0]))} tokens)"
        ) from None
    return ids, len(ids) - len(encode(passkey_text(n, depth, key)[1]))


def first_integer(text: str) -> str:
    match = re.search(r"\d+", text)
    return match.group(0) if match else ""


def depth_grid(n: int) -> list[float]:
    return [0.0] if n == 1 else [i / (n - 1) for i in range(n)]


def min_prompt_length(tokenizer) -> int:
    """Tokens of the longest filler-free prompt: any length below this cannot be built."""
    text = passkey_text(0, 0.0, 50000)[0]
    return len(tokenizer.with_bos(tokenizer.encode(text)))
