"""Passkey prompts in the Landmark-attention format, sized to an exact token length.

An instruction, repeated filler ("The grass is green. ...") with the passkey sentence at a
relative depth, then the question. Torch-free, so the config check can size prompts too.

Each prompt also reports its needle distance: how many tokens back from the prompt's last token
the needle's last token lies. A model whose attention reaches fewer tokens back than that (a
sliding window) cannot see the key directly.
"""

from __future__ import annotations

import re

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there. "
)
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[list[int], int]:
    """Token ids of a prompt of exactly `length` tokens with the needle at relative `depth`,
    and the needle distance (tokens from the needle's last token to the prompt's last)."""
    head, needle, tail = (
        tokenizer.encode(s) for s in (INSTRUCTION, NEEDLE.format(key=key), QUESTION)
    )
    n_filler = length - len(head) - len(needle) - len(tail)
    if n_filler < 0:
        raise ValueError(
            f"passkey length {length} is shorter than the bare prompt ({length - n_filler})"
        )
    unit = tokenizer.encode(FILLER)
    filler = (unit * (n_filler // len(unit) + 1))[:n_filler]
    cut = round(depth * n_filler)
    distance = (n_filler - cut) + len(tail)
    return head + filler[:cut] + needle + filler[cut:] + tail, distance


def first_integer(text: str) -> str:
    match = re.search(r"\d+", text)
    return match.group(0) if match else ""


def depth_grid(n: int) -> list[float]:
    return [0.0] if n == 1 else [i / (n - 1) for i in range(n)]


def min_prompt_length(tokenizer) -> int:
    """Tokens of the longest filler-free prompt: any length below this cannot be built."""
    parts = (INSTRUCTION, NEEDLE.format(key=50000), QUESTION)
    return sum(len(tokenizer.encode(p)) for p in parts)
