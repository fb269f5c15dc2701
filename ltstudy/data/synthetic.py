"""Synthetic documents that reward copying from context, mixed into training data (in the
spirit of Zoology's MQAR), so that retrieval evaluations can separate architectures at small
scale. Four kinds: key-value recall (statements scattered through filler text, then queries
answered by copying), passkey (one key hidden in filler text, asked for at the end), repeated
runs of words, and random strings each followed by its copy.

Recall and passkey documents mark their answers (the recalled values) as character spans, so
training can weight them (`train.answer_loss_weight`) as Zoology supervises MQAR's answers.
"""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Iterator, Mapping, Sequence

from ltstudy.data.corpus import Document
from ltstudy.evaluate.passkey_prompt import NEEDLE, QUESTION

ALPHANUMERIC = string.ascii_letters + string.digits

# (statement, query) templates; the query ends with the value, which must be recalled.
TEMPLATES = [
    ("The {k} key is {v}. ", "What is the {k} key? The {k} key is {v}. "),
    ("{k} is {v}. ", "So {k} is {v}. "),
    ("The value of {k} is {v}. ", "Recall the value of {k}: it is {v}. "),
    ("Remember: {k} = {v}. ", "Then {k} = {v}. "),
]


Span = tuple[int, int]


def _filler(rng: random.Random, fillers: Sequence[str], budget: int) -> list[str]:
    """Random filler sentences, at least `budget` characters of them."""
    filler: list[str] = []
    chars = 0
    while chars < budget:
        filler.append(rng.choice(fillers))
        chars += len(filler[-1])
    return filler


def _with_answer(text: str, template: str, value: str, **fields: str) -> tuple[str, Span]:
    """`text` followed by `template` filled in, and the character span of its `{v}` with the
    period after it: where a value ends is part of recalling it (a model trained on the
    digits alone learns to copy them but not to stop)."""
    before = template[: template.index("{v}.")].format(**fields)
    start = len(text) + len(before)
    return text + template.format(v=value, **fields), (start, start + len(value) + 1)


def recall_document(
    rng: random.Random, words: Sequence[str], fillers: Sequence[str], size: int
) -> tuple[str, list[Span]]:
    """About `size` characters: statements spread over the first part, queries at the end.
    Returns the text and the spans of the queried values."""
    statement, query = rng.choice(TEMPLATES)
    n_pairs = rng.randint(2, max(2, size // 80))
    keys = rng.sample(list(words), n_pairs)
    values = {k: str(rng.randint(1, 99999)) for k in keys}
    pieces = [statement.format(k=k, v=values[k]) for k in keys]
    order = rng.sample(keys, n_pairs)
    query_chars = sum(len(query.format(k=k, v=values[k])) for k in keys)
    filler = _filler(rng, fillers, size - sum(map(len, pieces)) - query_chars)
    slots = sorted(rng.randrange(len(filler) + 1) for _ in pieces)
    body = list(filler)
    for offset, (slot, piece) in enumerate(zip(slots, pieces, strict=True)):
        body.insert(slot + offset, piece)
    text, answers = "".join(body), []
    for k in order:
        text, span = _with_answer(text, query, values[k], k=k)
        answers.append(span)
    return text, answers


PASSKEY_LEAD = "Remember the pass key."


def passkey_document(
    rng: random.Random, fillers: Sequence[str], size: int
) -> tuple[str, list[Span]]:
    """A passkey prompt of random length up to `size` characters, in the evaluation's format:
    a short lead-in, whole filler sentences with the evaluation's needle between two of them,
    the question and the key, "\n"-joined as Landmark's prompt. The key is random and the
    filler is training text, so the evaluation still measures recall. Lengths are uniform, so
    many needles sit close to their question: the short distances a small model learns to copy
    over first."""
    key = str(rng.randint(1, 99999))
    needle = NEEDLE.format(key=key)
    answer = QUESTION + " {v}."
    fixed = len(PASSKEY_LEAD) + len(needle) + len(answer.format(v=key)) + 4  # four "\n"
    budget = rng.randint(0, max(0, size - fixed))
    sentences: list[str] = []
    for sentence in _filler(rng, [f.strip() for f in fillers], budget):
        if sum(len(s) + 1 for s in sentences) + len(sentence) <= budget:
            sentences.append(sentence)
    cut = rng.randint(0, len(sentences))
    lines = [PASSKEY_LEAD, " ".join(sentences[:cut]), needle, " ".join(sentences[cut:]), ""]
    text, span = _with_answer("\n".join(lines), answer, key)
    return text, [span]


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
    seed: int,
    words: Sequence[str],
    fillers: Sequence[str],
    size: int,
    mix: Mapping[str, int],
) -> Iterator[Document]:
    """Endless documents whose kinds follow a fixed cycle by their integer weights in `mix`
    ({"recall": 1, "repeat": 1} alternates the two), so the mix is exact at any count."""
    rng = random.Random(f"recall/{seed}")
    makers = {  # the cycle takes the kinds in this order; each gives (text, answer spans)
        "recall": lambda: recall_document(rng, words, fillers, size),
        "repeat": lambda: (repeat_document(rng, words, size), []),
        "chars": lambda: (chars_document(rng, size), []),
        "passkey": lambda: passkey_document(rng, fillers, size),
    }
    cycle = [kind for kind in makers for _ in range(mix.get(kind, 0))]
    if not cycle:
        raise ValueError(f"synthetic mix {dict(mix)} gives every kind weight 0")
    for i in itertools.count():
        kind = cycle[i % len(cycle)]
        text, answers = makers[kind]()
        yield Document(f"synthetic/{kind}/{i}", text, tuple(answers))
