"""RULER's 13 synthetic tasks: prompt generators sized to a token length, and scoring.

Tasks (NVIDIA/RULER `synthetic.yaml`): eight needle-in-a-haystack variants, variable tracking
(vt), common and frequent word extraction (cwe, fwe) and two QA tasks (qa_1: SQuAD, qa_2:
HotpotQA). The templates, needle formats, joins and counts follow RULER's generators
(`scripts/data/synthetic/*.py`). Haystacks are "noise" (the grass lines, "\\n"-joined), "essay"
(sentences of the corpus's validation documents standing in for Paul Graham's essays, " "-joined,
needles between sentences at depths drawn from 40 evenly spaced ones), or distractor needles.

As in RULER, a prompt is text whose haystack (lines, sentences, words or documents) is the
largest whole number of units for which prompt + generation budget <= `length` tokens in the
run's own tokenizer; RULER steps the count up in fixed increments, here it is bisected. Samples
are a pure function of (seed, task, length, index). Torch-free.
"""

from __future__ import annotations

import json
import random
import string
import uuid
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
# RULER's synthetic.yaml: haystack, key type, value type, keys, values per key, keys queried.
NIAH_SETUP = {
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
}
DEPTHS = [round(100 * i / 39) for i in range(40)]  # percent, as np.round(np.linspace(0, 100, 40))

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_TEMPLATE = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n{context}\nWhat are all the special magic "
    "{kind} for {query} mentioned in the provided text? The special magic {kind} for {query} "
    "mentioned in the provided text are"
)
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
    "above. Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
    "variables are assigned the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common "
    "words in the above list? Answer: The top 10 words that appear most often in the list are:"
)
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
    "Please ignore the dots '....'. What are the three most frequently appeared words in the "
    "above coded text? Answer: According to the coded text above, the three most frequently "
    "appeared words are:"
)
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the "
    "question based on the given documents. Only give me the answer and do not output any "
    "other words.\n\nQuestion: {query} Answer:"
)
QA_DOCUMENT = "Document {i}:\n{document}"
VT_ICL_TOKENS = 500  # RULER sizes vt's one-shot example as a 500-token sample
FWE_ALPHA = 2.0
CWE_COMMON = 10


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
class QAData:
    """Deduplicated documents and questions pointing into them: `gold` are the question's own
    documents, `related` the other paragraphs of its article (RULER's first distractors)."""

    questions: list[dict[str, Any]]
    docs: list[str]


@dataclass
class Sources:
    """What the generators draw from: essay sentences, a vocabulary and QA data."""

    sentences: list[str]
    words: list[str]
    squad: QAData | None = None
    hotpotqa: QAData | None = None
    skip_reasons: dict[str, str] = field(default_factory=dict)


def score(prediction: str, references: Sequence[str], metric: str) -> float:
    """RULER's string match, case-insensitive: the share of references found (all), or 100 if
    any is found (part)."""
    found = [ref.lower() in prediction.lower() for ref in references]
    if metric == "all":
        return 100.0 * sum(found) / len(found)
    return 100.0 * any(found)


# ---- sources ---------------------------------------------------------------------------


def load_squad(path: str | Path) -> QAData:
    """SQuAD (v1 or v2 JSON), as RULER reads it: distinct paragraphs are the documents; each
    answerable question has its paragraph and its article's other paragraphs."""
    data = json.loads(Path(path).read_text())["data"]
    docs = sorted({p["context"] for a in data for p in a["paragraphs"]})
    number = {doc: i for i, doc in enumerate(docs)}
    questions = []
    for article in data:
        article_docs = [number[p["context"]] for p in article["paragraphs"]]
        for para in article["paragraphs"]:
            gold = number[para["context"]]
            related = list(dict.fromkeys(i for i in article_docs if i != gold))
            for qa in para["qas"]:
                answers = [a["text"] for a in qa.get("answers", [])]
                if answers and not qa.get("is_impossible"):
                    questions.append(
                        {
                            "question": qa["question"],
                            "answers": answers,
                            "gold": [gold],
                            "related": related,
                        }
                    )
    return QAData(questions, docs)


def load_hotpotqa(path: str | Path) -> QAData:
    """HotpotQA distractor JSON, as RULER reads it: every paragraph "title\\ntext" is a
    document, and a question's own (gold and distractor) paragraphs always go in."""
    items = json.loads(Path(path).read_text())
    as_doc = [[f"{title}\n{''.join(sents)}" for title, sents in it["context"]] for it in items]
    docs = sorted({d for item_docs in as_doc for d in item_docs})
    number = {doc: i for i, doc in enumerate(docs)}
    questions = [
        {
            "question": it["question"],
            "answers": [it["answer"]],
            "gold": list(dict.fromkeys(number[d] for d in item_docs)),
            "related": [],
        }
        for it, item_docs in zip(items, as_doc, strict=True)
    ]
    return QAData(questions, docs)


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


# ---- sizing ----------------------------------------------------------------------------

Build = Callable[[int], str]


def largest_prompt(
    encode: Callable[[str], list[int]], limit: int, build: Build, low: int, high: int
) -> tuple[list[int], int]:
    """Token ids of build(n), and n, for the largest n in [low, high] whose prompt fits in
    `limit` tokens (galloped up, then bisected). ValueError if build(low) does not fit."""
    ids = encode(build(low))
    if len(ids) > limit:
        raise ValueError(f"the shortest prompt has {len(ids)} tokens, over the {limit} allowed")
    best, step, over = low, 1, high + 1
    while best < high:
        n = min(best + step, high)
        candidate = encode(build(n))
        if len(candidate) > limit:
            over = n
            break
        best, ids, step = n, candidate, step * 2
    while over - best > 1:
        n = (best + over) // 2
        candidate = encode(build(n))
        if len(candidate) <= limit:
            best, ids = n, candidate
        else:
            over = n
    return ids, best


def _first_fitting(encode, limit: int, attempts: Sequence[tuple[Build, int, int]]):
    """The first of (build, low, high) whose shortest prompt fits; RULER's settings come first,
    then fallbacks for lengths too short to hold them."""
    for build, low, high in attempts[:-1]:
        try:
            return largest_prompt(encode, limit, build, low, high)[0]
        except ValueError:
            continue
    return largest_prompt(encode, limit, *attempts[-1])[0]


# ---- tasks -----------------------------------------------------------------------------


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _insert_lines(lines: list[str], needles: list[str], rng: random.Random) -> str:
    """RULER's noise/needle haystacks: needles inserted before random lines, "\\n"-joined."""
    lines = list(lines)
    slots = sorted(rng.sample(range(len(lines)), len(needles)), reverse=True)
    for slot, needle in zip(slots, needles, strict=True):
        lines.insert(slot, needle)
    return "\n".join(lines)


def _insert_at_depths(sentences: list[str], needles: list[str], rng: random.Random) -> str:
    """RULER's essay haystack: needles between sentences at distinct depths, " "-joined."""
    cuts = sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(needles)))
    cuts = [0, *cuts, len(sentences)]
    parts = []
    for i in range(1, len(cuts)):
        parts.append(" ".join(sentences[cuts[i - 1] : cuts[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    return " ".join(parts)


def _niah(task: str, key: str, rng: random.Random, src: Sources, fit) -> tuple[list, list]:
    haystack, key_type, value_type, n_keys, n_values, n_queries = NIAH_SETUP[task]
    kind = value_type  # "numbers" or "uuids", plural in the needles as in RULER

    def new_key(r: random.Random) -> str:
        if key_type == "uuids":
            return _uuid(r)
        if haystack == "needle":  # thousands of distinct distractor keys: pairs of words
            return f"{r.choice(src.words)}-{r.choice(src.words)}"
        return r.choice(src.words)

    def new_value(r: random.Random) -> str:
        return _uuid(r) if value_type == "uuids" else _number(r)

    keys: list[str] = []
    while len(keys) < n_keys:  # distinct keys: one answer per queried key
        k = new_key(rng)
        if k not in keys:
            keys.append(k)
    values = [[new_value(rng) for _ in range(n_values)] for _ in keys]
    needles = [
        NEEDLE.format(kind=kind, key=k, value=v)
        for k, vs in zip(keys, values, strict=True)
        for v in vs
    ]
    rng.shuffle(needles)
    queried = rng.sample(range(n_keys), n_queries)
    queries = [keys[i] for i in queried]
    answers = [v for i in queried for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, shown = NIAH_TEMPLATE, kind
    if n_queries * n_values == 1:  # RULER's singular wording for one needle asked once
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        shown = kind[:-1]

    if haystack == "essay":
        offset = rng.randrange(len(src.sentences))
        sentences = [s.strip() for s in src.sentences[offset:] + src.sentences[:offset]]

        def context(n: int) -> str:
            units = [sentences[i % len(sentences)] for i in range(n)]
            return _insert_at_depths(units, needles, random.Random(f"{key}/{n}"))
    else:
        lines: list[str] = []
        line_rng, used = random.Random(f"{key}/haystack"), set(keys)

        def line(i: int) -> str:
            misses = 0
            while len(lines) <= i:
                if haystack == "noise":
                    lines.append(NOISE)
                    continue
                k = new_key(line_rng)
                if k not in used:  # a distractor never repeats the queried key
                    used.add(k)
                    lines.append(NEEDLE.format(kind=kind, key=k, value=new_value(line_rng)))
                elif (misses := misses + 1) > 10_000:
                    raise ValueError(f"too few words for {i + 1} distinct keys")
            return lines[i]

        def context(n: int) -> str:
            units = [line(i) for i in range(n)]
            return _insert_lines(units, needles, random.Random(f"{key}/{n}"))

    def build(n: int) -> str:
        return template.format(kind=shown, context=context(n), query=query)

    low = 0 if haystack == "essay" else len(needles)
    return fit([(build, low, 10**7)]), answers


def _vt_chain(rng: random.Random, name_length: int, hops: int = 4) -> tuple[list[str], list[str]]:
    names: list[str] = []  # a list, not a set: set order varies between processes
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_length))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {rng.randint(10000, 99998)}"]
    chain += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, chain


def _vt_prompt(chain: list[str], n: int, rng: random.Random) -> str:
    """RULER's vt: the chain in order at random places among n noise lines; with too few
    lines, the lines are split into sentences first."""
    sentences = [NOISE + "\n"] * n
    if len(sentences) <= len(chain):
        pieces = [p for s in sentences for p in s.split(".")]
        sentences = [p + "." if p.strip() else p for p in pieces]
    slots = sorted(rng.sample(range(len(sentences)), len(chain)))
    for j, (slot, link) in enumerate(zip(slots, chain, strict=True)):
        sentences.insert(slot + j, link)
    context = " ".join(sentences).replace(". \n", ".\n")
    value = chain[0].split("=")[-1].strip()
    return VT_TEMPLATE.format(context=context, query=value, num_v=len(chain))


def _vt(key: str, rng: random.Random, encode, fit) -> tuple[list, list]:
    names, chain = _vt_chain(rng, 5)
    example_names, example_chain = _vt_chain(rng, 3)
    answer = " ".join(example_names)

    def example_text(n: int) -> str:
        return _vt_prompt(example_chain, n, random.Random(f"{key}/example")) + " " + answer

    try:  # RULER's one-shot example: the most noise lines within its 500-token budget
        lines = largest_prompt(
            encode, VT_ICL_TOKENS - MAX_NEW_TOKENS["vt"], example_text, 1, 10**5
        )[1]
    except ValueError:  # short tokens (bytes): one line, where RULER's own search stalls
        lines = 1
    example = example_text(lines)

    def main(n: int) -> str:
        return _vt_prompt(chain, n, random.Random(f"{key}/{n}"))

    def with_example(n: int) -> str:
        return example + "\n\n" + "\n\n" + main(n)

    return fit([(with_example, 1, 10**7), (main, 1, 10**7)]), names


def _cwe(key: str, length: int, rng: random.Random, src: Sources, fit) -> tuple[list, list]:
    # RULER: 10 common words 30 times among words 3 times from 4K tokens up, 6 and 1 below;
    # the one-shot example repeats them 10 and 3 times (3 and 1 below 4K).
    freq_cw, freq_ucw = (30, 3) if length >= 4096 else (6, 1)
    example_words, example_cw, example_ucw = (40, 10, 3) if length >= 4096 else (20, 3, 1)
    pool = rng.sample(src.words, len(src.words))

    def listing(words: list[str], n: int, cw: int, ucw: int, r: random.Random) -> str:
        common, uncommon = words[:CWE_COMMON], words[CWE_COMMON:n]
        items = common * cw + uncommon * ucw
        r.shuffle(items)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))

    shown = rng.sample(src.words, min(example_words, len(src.words)))
    example = CWE_TEMPLATE.format(
        context=listing(shown, len(shown), example_cw, example_ucw, random.Random(f"{key}/ex"))
    ) + " ".join(f"{i + 1}. {w}" for i, w in enumerate(shown[:CWE_COMMON]))

    def main(cw: int, ucw: int) -> Build:
        def build(n: int) -> str:
            text = listing(pool, n, cw, ucw, random.Random(f"{key}/{n}"))
            return CWE_TEMPLATE.format(context=text)

        return build

    def with_example(n: int) -> str:
        return example + "\n" + main(freq_cw, freq_ucw)(n)

    low, high = CWE_COMMON, len(pool)
    attempts = [(with_example, low, high), (main(freq_cw, freq_ucw), low, high)]
    attempts += [(main(cw, 1), low, high) for cw in range(freq_cw - 1, 1, -1)]
    return fit(attempts), pool[:CWE_COMMON]


def _zeta(alpha: float) -> float:
    """Riemann zeta(alpha) for alpha > 1 (Euler-Maclaurin: a partial sum plus the tail)."""
    n = 100
    return (
        sum(k**-alpha for k in range(1, n))
        + n ** (1 - alpha) / (alpha - 1)
        + n**-alpha / 2
        + alpha * n ** (-alpha - 1) / 12
        - alpha * (alpha + 1) * (alpha + 2) * n ** (-alpha - 3) / 720
    )


def fwe_counts(num_words: int, vocab_size: int, alpha: float = FWE_ALPHA) -> list[int]:
    """RULER's fwe counts: the word of rank k appears int(num_words * k^-alpha / zeta(alpha))
    times."""
    z = _zeta(alpha)
    return [int(num_words * k**-alpha / z) for k in range(1, vocab_size + 1)]


def _fwe(key: str, length: int, budget: int, rng: random.Random, fit) -> tuple[list, list]:
    # RULER: a vocabulary of (max_seq_length - tokens_to_generate) // 50 coded words, zeta
    # counts, and "..." as the top-ranked word (noise); the answer is ranks 2-4.
    vocab_size = max(4, (length - budget) // 50)
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."

    def build(n: int) -> str:
        words = [
            w for w, c in zip(ranked, fwe_counts(n, vocab_size), strict=True) for _ in range(c)
        ]
        random.Random(f"{key}/{n}").shuffle(words)
        return FWE_TEMPLATE.format(context=" ".join(words))

    # the fewest words for which all three answers appear: rank 4 needs count >= 1
    low = int(4**FWE_ALPHA * _zeta(FWE_ALPHA)) + 1
    return fit([(build, low, 10**9)]), ranked[1:4]


def _qa(task: str, key: str, index: int, src: Sources, fit) -> tuple[list, list]:
    data = src.squad if task == "qa_1" else src.hotpotqa
    if not data or not data.questions:
        raise TaskSkipped(src.skip_reasons.get(task, "no QA data"))
    q = data.questions[index % len(data.questions)]  # RULER: sample i asks question i
    rng = random.Random(key)
    gold, related = q["gold"], q["related"]
    others = [i for i in range(len(data.docs)) if i not in set(gold) | set(related)]
    # distractors: the article's other paragraphs first, then any others (RULER's order)
    order = gold + rng.sample(related, len(related)) + rng.sample(others, len(others))

    def build(n: int) -> str:
        docs = [data.docs[i] for i in order[:n]]
        random.Random(f"{key}/{n}").shuffle(docs)
        context = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(docs))
        return QA_TEMPLATE.format(context=context, query=q["question"])

    return fit([(build, len(gold), len(order))]), q["answers"]


def check_length(task: str, tokenizer, length: int, max_new_tokens: int | None = None) -> None:
    """Raise ValueError if `length` tokens cannot hold the task's prompt and generation budget
    (checked on stand-in sources, so configs fail before any job runs)."""
    if task in ("qa_1", "qa_2"):
        return
    # the longest words a vocabulary holds (10 letters), so real sources fit too
    words = [f"word{a}{b}{c}xyz" for a in "abcdefgh" for b in "abcdefgh" for c in "abcdefgh"]
    stand_in = Sources(["A stand-in sentence for the haystack. "] * 8, words)
    for index in range(4):
        generate(task, tokenizer, length, index, 0, stand_in, max_new_tokens)


def generate(
    task: str,
    tokenizer,
    length: int,
    index: int,
    seed: int,
    sources: Sources,
    max_new_tokens: int | None = None,
) -> Sample:
    """Sample `index` of `task`: a prompt of at most `length` minus its generation budget
    tokens. Raises TaskSkipped when it cannot run, ValueError when `length` is too short."""
    if task not in TASKS:
        raise KeyError(f"unknown RULER task {task!r} (known: {', '.join(TASKS)})")
    budget = MAX_NEW_TOKENS[task]
    if max_new_tokens is not None:
        budget = min(max_new_tokens, budget)
    key = f"{seed}/{task}/{length}/{index}"
    rng = random.Random(key)
    limit = length - budget

    def encode(text: str) -> list[int]:
        return tokenizer.with_bos(tokenizer.encode(text))

    def fit(attempts: Sequence[tuple[Build, int, int]]) -> list[int]:
        try:
            return _first_fitting(encode, limit, attempts)
        except ValueError as why:
            raise ValueError(f"RULER {task} at length {length}: {why}") from None

    if task in NIAH:
        prompt, refs = _niah(task, key, rng, sources, fit)
    elif task == "vt":
        prompt, refs = _vt(key, rng, encode, fit)
    elif task == "cwe":
        prompt, refs = _cwe(key, length, rng, sources, fit)
    elif task == "fwe":
        prompt, refs = _fwe(key, length, budget, rng, fit)
    else:
        prompt, refs = _qa(task, key, index, sources, fit)
    return Sample(task, length, index, prompt, refs, budget, METRIC[task])
