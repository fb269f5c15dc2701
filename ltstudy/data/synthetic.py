"""Synthetic documents that reward copying from context, mixed into training data (in the
spirit of Zoology's MQAR), so that retrieval evaluations can separate architectures at small
scale. Three kinds: key-value recall (statements scattered through filler text, then queries
answered by copying), repeated runs of words, and random strings each followed by its copy.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator, Mapping, Sequence

from ltstudy.data.corpus import Document

ALPHANUMERIC = string.ascii_letters + string.digits

# (statement, query) templates; the query ends with the value, which must be recalled.
TEMPLATES = [
    ("The {k} key is {v}. ", "What is the {k} key? The {k} key is {v}. "),
    ("{k} is {v}. ", "So {k} is {v}. "),
    ("The value of {k} is {v}. ", "Recall the value of {k}: it is {v}. "),
    ("Remember: {k} = {v}. ", "Then {k} = {v}. "),
]


def recall_document(
    rng: random.Random, words: Sequence[str], fillers: Sequence[str], size: int
) -> str:
    """About `size` characters: statements spread over the first part, queries at the end."""
    statement, query = rng.choice(TEMPLATES)
    n_pairs = rng.randint(2, max(2, size // 80))
    keys = rng.sample(list(words), n_pairs)
    values = {k: str(rng.randint(1, 99999)) for k in keys}
    pieces = [statement.format(k=k, v=values[k]) for k in keys]
    questions = "".join(query.format(k=k, v=values[k]) for k in rng.sample(keys, n_pairs))
    budget = max(0, size - sum(map(len, pieces)) - len(questions))
    filler = []
    while sum(map(len, filler)) < budget:
        filler.append(rng.choice(fillers))
    slots = sorted(rng.randrange(len(filler) + 1) for _ in pieces)
    body = list(filler)
    for offset, (slot, piece) in enumerate(zip(slots, pieces, strict=True)):
        body.insert(slot + offset, piece)
    return "".join(body) + questions


def repeat_document(rng: random.Random, words: Sequence[str], size: int) -> str:
    """A random run of words and numbers, then the same run again: every token of the second
    copy is predictable only by looking back, the signal that grows induction heads fast."""
    items: list[str] = []
    while sum(len(w) + 1 for w in items) < size // 2:
        items.append(rng.choice(words) if rng.random() < 0.7 else str(rng.randint(0, 9999)))
    run = " ".join(items)
    return f"{run}. {run}."


def chars_document(rng: random.Random, size: int) -> str:
    """Random letter-and-digit strings of varying length, each followed by a copy of itself.

    The copy can only be predicted by finding the string's earlier occurrence by content (no
    fixed offset works, and the text has no statistics to lean on): the cleanest signal there
    is for induction heads, the mechanism that passkey retrieval needs.
    """
    pieces: list[str] = []
    while sum(map(len, pieces)) < size:
        run = "".join(rng.choices(ALPHANUMERIC, k=rng.randint(8, 64)))
        pieces.append(f"{run} {run}\n")
    return "".join(pieces)


def synthetic_documents(
    count: int,
    seed: int,
    words: Sequence[str],
    fillers: Sequence[str],
    size: int,
    mix: Mapping[str, int],
) -> Iterator[Document]:
    """`count` documents whose kinds follow a fixed cycle by their integer weights in `mix`
    ({"recall": 1, "repeat": 1} alternates the two), so the mix is exact at any count."""
    rng = random.Random(f"recall/{seed}")
    makers = {  # the cycle takes the kinds in this order
        "recall": lambda: recall_document(rng, words, fillers, size),
        "repeat": lambda: repeat_document(rng, words, size),
        "chars": lambda: chars_document(rng, size),
    }
    cycle = [kind for kind in makers for _ in range(mix.get(kind, 0))]
    if not cycle:
        raise ValueError(f"synthetic mix {dict(mix)} gives every kind weight 0")
    for i in range(count):
        kind = cycle[i % len(cycle)]
        yield Document(f"synthetic/{kind}/{i}", makers[kind]())
