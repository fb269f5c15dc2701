"""Synthetic key-value recall documents, mixed into training data (in the spirit of Zoology's
MQAR): statements "key -> value" scattered through filler text, then queries whose answers can
only be copied from earlier in the document. They give small models a retrieval skill to
learn, so that retrieval evaluations separate architectures even at demo scale.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from ltstudy.data.corpus import Document

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


def recall_documents(
    count: int, seed: int, words: Sequence[str], fillers: Sequence[str], size: int
) -> Iterator[Document]:
    """Half key-value recall documents, half repeated runs."""
    rng = random.Random(f"recall/{seed}")
    for i in range(count):
        if i % 2:
            yield Document(f"synthetic/repeat/{i}", repeat_document(rng, words, size))
        else:
            yield Document(f"synthetic/recall/{i}", recall_document(rng, words, fillers, size))
