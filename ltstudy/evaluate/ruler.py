"""RULER's 13 synthetic tasks: prompt generators sized to an exact token length, and scoring.

Tasks (NVIDIA/RULER `synthetic.yaml`): eight needle-in-a-haystack variants, variable tracking
(vt), common and frequent word extraction (cwe, fwe) and two QA tasks (qa_1: SQuAD, qa_2:
HotpotQA). Haystacks are "noise" (repeated grass sentences), "essay" (sentences of the corpus's
validation documents, standing in for Paul Graham's essays) or needles only.

A prompt is assembled from token lists (instruction, haystack pieces, needles, question), and
the haystack is cut to the token, so every prompt has exactly the requested length in the
run's own tokenizer. Needles go between haystack sentences at depths drawn from 40 evenly
spaced positions. Samples are a pure function of (seed, task, length, index). Torch-free.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ltstudy.data.text import split_sentences, vocabulary

NIAH = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
)
TASKS = (*NIAH, "vt", "cwe", "fwe", "qa_1", "qa_2")
# RULER's generation budgets (tokens) and metrics: all references / any reference.
MAX_NEW_TOKENS = {
    **dict.fromkeys(NIAH, 128),
    "vt": 30,
    "cwe": 120,
    "fwe": 50,
    "qa_1": 32,
    "qa_2": 32,
}
METRIC = {**dict.fromkeys((*NIAH, "vt", "cwe", "fwe"), "all"), "qa_1": "part", "qa_2": "part"}
DEPTHS = [i / 39 for i in range(40)]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NIAH_PREFIX = (
    "Some special magic {kind} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {kind} afterwards.\n"
)
NIAH_QUESTION = (
    "\nWhat are all the special magic {kind} for {query} mentioned in the provided "
    "text? The special magic {kind} for {query} mentioned in the provided text are"
)
NEEDLE = "One of the special magic {kind} for {key} is: {value}. "
VT_PREFIX = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
)
VT_QUESTION = (
    "\nQuestion: Find all variables that are assigned the value {value} in the text "
    "above. Answer: According to the chain(s) of variable assignment in the text "
    "above, {n} variables are assigned the value {value}, they are: "
)
CWE_PREFIX = (
    "Below is a numbered list of words. In these words, some appear more often than "
    "others. Memorize the ones that appear most often.\n"
)
CWE_QUESTION = (
    "\nQuestion: What are the 10 most common words in the above list? Answer: The "
    "top 10 words that appear most often in the list are:"
)
FWE_PREFIX = (
    "Read the following coded text and track the frequency of each coded word. Find "
    "the three most frequently appeared coded words. "
)
FWE_QUESTION = (
    "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What "
    "are the three most frequently appeared words in the above coded text? Answer: "
    "According to the coded text above, the three most frequently appeared words are:"
)
QA_PREFIX = (
    "Answer the question based on the given documents. Only give me the answer and do "
    "not output any other words.\n\nThe following are given documents.\n\n"
)
QA_QUESTION = (
    "\n\nAnswer the question based on the given documents. Only give me the answer "
    "and do not output any other words.\n\nQuestion: {question} Answer:"
)


class TaskSkipped(Exception):
    """The task cannot run here (e.g. its QA data is not on this machine); the reason is kept."""


@dataclass
class Sample:
    task: str
    length: int
    index: int
    prompt: list[int]
    references: list[str]
    max_new_tokens: int
    metric: str


@dataclass
class Sources:
    """What the generators draw from: essay sentences, a vocabulary and QA records."""

    sentences: list[str]
    words: list[str]
    squad: list[dict[str, Any]] | None = None
    hotpotqa: list[dict[str, Any]] | None = None
    skip_reasons: dict[str, str] = field(default_factory=dict)


def score(prediction: str, references: Sequence[str], metric: str) -> float:
    """RULER's string match, case-insensitive: the share of references found (all), or 100 if
    any is found (part)."""
    found = [ref.lower() in prediction.lower() for ref in references]
    if metric == "all":
        return 100.0 * sum(found) / len(found)
    return 100.0 * any(found)


# ---- sources ---------------------------------------------------------------------------


def load_squad(path: str | Path) -> list[dict[str, Any]]:
    """SQuAD (v1 or v2 JSON): answerable questions with their context and answers."""
    data = json.loads(Path(path).read_text())["data"]
    records = []
    for article in data:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = [a["text"] for a in qa.get("answers", [])]
                if answers and not qa.get("is_impossible"):
                    records.append(
                        {"question": qa["question"], "answers": answers, "context": para["context"]}
                    )
    return records


def load_hotpotqa(path: str | Path) -> list[dict[str, Any]]:
    """HotpotQA distractor JSON: question, answer and its paragraphs as documents."""
    records = []
    for item in json.loads(Path(path).read_text()):
        docs = [f"{title}\n{''.join(sents)}" for title, sents in item["context"]]
        records.append({"question": item["question"], "answers": [item["answer"]], "docs": docs})
    return records


def build_sources(
    validation_texts: Sequence[str], squad_path: str | None = None, hotpotqa_path: str | None = None
) -> Sources:
    sources = Sources(split_sentences(validation_texts), vocabulary(validation_texts))
    for task, path, loader, attr in (
        ("qa_1", squad_path, load_squad, "squad"),
        ("qa_2", hotpotqa_path, load_hotpotqa, "hotpotqa"),
    ):
        if not path:
            sources.skip_reasons[task] = f"no local data configured (evaluate.ruler.{attr}_path)"
        elif not Path(path).is_file():
            sources.skip_reasons[task] = f"{path} not found"
        else:
            setattr(sources, attr, loader(path))
    return sources


# ---- prompt assembly -------------------------------------------------------------------


class Builder:
    """Token-level prompt assembly: fixed parts, a haystack cut to fit, needles inserted."""

    def __init__(self, tokenizer, length: int):
        self.tok, self.length = tokenizer, length

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def haystack(self, units: Callable[[int], str], budget: int) -> list[list[int]]:
        """Token lists of haystack units (unit(i) for i = 0, 1, ...) totalling exactly budget."""
        pieces, used, i = [], 0, 0
        while used < budget:
            ids = self.encode(units(i))[: budget - used]
            pieces.append(ids)
            used += len(ids)
            i += 1
        return pieces

    def assemble(
        self,
        head: str,
        pieces: list[list[int]],
        needles: list[list[int]],
        depths: list[float],
        tail: str,
    ) -> list[int]:
        """head + haystack pieces with needles at the piece boundaries nearest their depths +
        tail. `pieces` must already leave room for the needles."""
        slots = sorted(zip(depths, range(len(needles)), strict=True))
        body: list[int] = []
        boundaries = len(pieces)
        cursor = 0
        for depth, n in slots:
            cut = round(depth * boundaries)
            for piece in pieces[cursor:cut]:
                body += piece
            cursor = max(cursor, cut)
            body += needles[n]
        for piece in pieces[cursor:]:
            body += piece
        prompt = self.encode(head) + body + self.encode(tail)
        if len(prompt) != self.length:
            raise AssertionError(f"prompt of {len(prompt)} tokens, wanted {self.length}")
        return prompt

    def budget(self, head: str, tail: str, needles: list[list[int]]) -> int:
        left = (
            self.length - len(self.encode(head)) - len(self.encode(tail)) - sum(map(len, needles))
        )
        if left < 0:
            raise ValueError(f"{self.length} tokens cannot hold this task's prompt")
        return left


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _distinct(rng: random.Random, pool: Sequence[str], n: int) -> list[str]:
    return rng.sample(list(pool), n)


def _niah(task: str, b: Builder, rng: random.Random, src: Sources) -> tuple[list[int], list[str]]:
    uuid_keys = task == "niah_multikey_3"
    uuid_values = task in ("niah_single_3", "niah_multikey_3")
    kind = "uuids" if uuid_values else "numbers"
    value = (lambda: _uuid(rng)) if uuid_values else (lambda: _number(rng))
    n_keys = {"niah_multikey_1": 4, "niah_multiquery": 4}.get(task, 1)
    n_values = 4 if task == "niah_multivalue" else 1
    keys = [_uuid(rng) for _ in range(n_keys)] if uuid_keys else _distinct(rng, src.words, n_keys)
    pairs = [(k, value()) for k in keys for _ in range(n_values)]
    queried = keys if task == "niah_multiquery" else keys[:1]
    answers = [v for k, v in pairs if k in queried]
    query = ", ".join(queried[:-1]) + (" and " if len(queried) > 1 else "") + queried[-1]
    head, tail = NIAH_PREFIX.format(kind=kind), NIAH_QUESTION.format(kind=kind, query=query)
    needles = [b.encode(NEEDLE.format(kind=kind, key=k, value=v)) for k, v in pairs]
    budget = b.budget(head, tail, needles)
    if task in ("niah_multikey_2", "niah_multikey_3"):  # the haystack is all distractor needles

        def units(i: int) -> str:
            key = _uuid(rng) if uuid_keys else rng.choice(src.words)
            return NEEDLE.format(kind=kind, key=key, value=value())
    elif task == "niah_single_1":

        def units(i: int) -> str:
            return NOISE
    else:
        offset = rng.randrange(max(1, len(src.sentences)))

        def units(i: int) -> str:
            return src.sentences[(offset + i) % len(src.sentences)]

    pieces = b.haystack(units, budget)
    depths = [rng.choice(DEPTHS) for _ in needles]
    return b.assemble(head, pieces, needles, depths, tail), answers


def _vt(b: Builder, rng: random.Random, src: Sources) -> tuple[list[int], list[str]]:
    names: list[str] = []  # a list, not a set: set order varies between processes
    while len(names) < 5:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}. "] + [
        f"VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, 5)
    ]
    needles = [b.encode(s) for s in chain]
    head, tail = VT_PREFIX, VT_QUESTION.format(value=value, n=len(names))
    pieces = b.haystack(lambda i: NOISE, b.budget(head, tail, needles))
    depths = sorted(rng.choice(DEPTHS) for _ in needles)  # the chain stays in order
    return b.assemble(head, pieces, needles, depths, tail), names


def _cwe(b: Builder, rng: random.Random, src: Sources) -> tuple[list[int], list[str]]:
    common = _distinct(rng, src.words[:2000], 10)
    others = [w for w in src.words if w not in common]
    head, tail = CWE_PREFIX, CWE_QUESTION
    budget = b.budget(head, tail, [])
    per_word = len(b.encode(" 99. " + common[0]))
    # RULER: 10 common words 30 times among words appearing 3 times; fewer when short.
    repeats = max(2, min(30, budget // (per_word * 10 * 2)))
    words = common * repeats
    n_others = max(0, (budget - len(words) * per_word) // (per_word * min(3, repeats - 1)) + 1)
    words += [
        w
        for w in rng.sample(others, min(n_others, len(others)))
        for _ in range(min(3, repeats - 1))
    ]
    rng.shuffle(words)
    pieces = b.haystack(lambda i: f"{i + 1}. {words[i % len(words)]} ", budget)
    return b.assemble(head, pieces, [], [], tail), common


def _fwe(b: Builder, rng: random.Random, src: Sources) -> tuple[list[int], list[str]]:
    coded = sorted(
        {"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(200)}
    )
    rng.shuffle(coded)
    weights = [1 / (rank + 1) ** 2 for rank in range(len(coded))]  # Zipf, alpha = 2
    head, tail = FWE_PREFIX, FWE_QUESTION
    budget = b.budget(head, tail, [])
    stream = rng.choices(coded, weights=weights, k=budget)  # more than enough words
    pieces = b.haystack(
        lambda i: stream[i % len(stream)] + (" .... " if i % 10 == 9 else " "), budget
    )
    counts = Counter(stream[: len(pieces)])
    top = [w for w, _ in counts.most_common(3)]
    return b.assemble(head, pieces, [], [], tail), top


def _qa(task: str, b: Builder, rng: random.Random, src: Sources) -> tuple[list[int], list[str]]:
    records = src.squad if task == "qa_1" else src.hotpotqa
    if not records:
        raise TaskSkipped(src.skip_reasons.get(task, "no QA data"))
    record = rng.choice(records)
    gold = [record["context"]] if task == "qa_1" else record["docs"]
    pool = [r for r in records if r is not record]
    distractors = (
        r["context"] if task == "qa_1" else rng.choice(r["docs"])
        for r in rng.sample(pool, len(pool))
    )
    head, tail = QA_PREFIX, QA_QUESTION.format(question=record["question"])
    needles = [b.encode(f"Document {i + 1}:\n{d}\n\n") for i, d in enumerate(gold)]
    budget = b.budget(head, tail, needles)
    texts = iter(distractors)
    pieces = b.haystack(
        lambda i: f"Document {len(gold) + i + 1}:\n{next(texts, NOISE)}\n\n", budget
    )
    depths = [rng.choice(DEPTHS) for _ in needles]
    return b.assemble(head, pieces, needles, depths, tail), record["answers"]


def check_length(task: str, tokenizer, length: int) -> None:
    """Raise ValueError if `length` tokens cannot hold the task's prompt (checked on stand-in
    sources, so configs fail before any job runs)."""
    if task in ("qa_1", "qa_2"):
        return
    words = [f"w{a}{b}{c}" for a in "abcdefgh" for b in "abcdefgh" for c in "abcdefgh"]
    stand_in = Sources(["A stand-in sentence for the haystack. "] * 8, words)
    for index in range(4):
        generate(task, tokenizer, length, index, 0, stand_in)


def generate(
    task: str,
    tokenizer,
    length: int,
    index: int,
    seed: int,
    sources: Sources,
    max_new_tokens: int | None = None,
) -> Sample:
    """Sample `index` of `task` at `length` tokens. Raises TaskSkipped when it cannot run."""
    if task not in TASKS:
        raise KeyError(f"unknown RULER task {task!r} (known: {', '.join(TASKS)})")
    rng = random.Random(f"{seed}/{task}/{length}/{index}")
    b = Builder(tokenizer, length)
    if task in NIAH:
        prompt, refs = _niah(task, b, rng, sources)
    elif task in ("qa_1", "qa_2"):
        prompt, refs = _qa(task, b, rng, sources)
    else:
        prompt, refs = {"vt": _vt, "cwe": _cwe, "fwe": _fwe}[task](b, rng, sources)
    budget = (
        MAX_NEW_TOKENS[task]
        if max_new_tokens is None
        else min(max_new_tokens, MAX_NEW_TOKENS[task])
    )
    return Sample(task, length, index, prompt, refs, budget, METRIC[task])
