"""RULER's 13 task generators against RULER's own rules (NVIDIA/RULER scripts/data/synthetic):
prompt + generation budget within the length, templates and joins, distinct keys, singular
wording, cwe and fwe counts, one-shot examples, QA documents, scoring, and skips."""

import json
import math
import re
from collections import Counter

import pytest

from ltstudy.data.corpus import embedded_documents
from ltstudy.data.tokenizer import ByteTokenizer
from ltstudy.evaluate.ruler import NIAH, TASKS, TaskSkipped, build_sources, generate, score

TEXTS = [doc.text for _, doc in zip(range(40), embedded_documents(), strict=False)]
GRASS = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = re.compile(r"One of the special magic (?:numbers|uuids) for (\S+) is: (\S+)\.")


def qa_files(tmp_path, articles=3, paragraphs=6):
    """A SQuAD-like file (articles of paragraphs, two questions per paragraph, so paragraphs
    repeat across questions) and a HotpotQA-like one (each question with its own paragraphs)."""
    squad = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": f"Article {a} paragraph {p}: the capital of place{a}x{p} is "
                        f"city{a}x{p}, and its river is river{a}x{p}.",
                        "qas": [
                            {
                                "question": f"What is the {what} of place{a}x{p}?",
                                "is_impossible": False,
                                "answers": [{"text": f"{what}{a}x{p}"}],
                            }
                            for what in ("city", "river")
                        ],
                    }
                    for p in range(paragraphs)
                ]
            }
            for a in range(articles)
        ]
    }
    hotpot = [
        {
            "question": f"Who founded company{i}?",
            "answer": f"person{i}",
            "context": [
                [f"Company{i}", [f"Company{i} was founded by person{i}. ", "It grew."]],
                [f"Other{i}", [f"Unrelated facts about weather{i}. "]],
            ],
        }
        for i in range(20)
    ]
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    (tmp_path / "hotpot.json").write_text(json.dumps(hotpot))
    return str(tmp_path / "squad.json"), str(tmp_path / "hotpot.json")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return build_sources(TEXTS, *qa_files(tmp_path_factory.mktemp("qa")))


@pytest.fixture(scope="module")
def tokenizers_under_test(tmp_path_factory):
    """Bytes, and a BPE tokenizer (where token counts do not add up over concatenated text)."""
    from tokenizers import ByteLevelBPETokenizer

    from ltstudy.data.tokenizer import HFTokenizer

    folder = tmp_path_factory.mktemp("bpe")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=600, special_tokens=["<|endoftext|>"])
    bpe.save(str(folder / "tokenizer.json"))
    return {"bytes": ByteTokenizer(), "bpe": HFTokenizer(folder)}


def between(text: str, start: str, end: str) -> str:
    return text[text.index(start) + len(start) : text.rindex(end)]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("tok_name", ["bytes", "bpe"])
@pytest.mark.parametrize("length", [1024, 2048])
def test_generator(task, tok_name, length, tokenizers_under_test, sources):
    tok = tokenizers_under_test[tok_name]
    for index in range(3):
        sample = generate(task, tok, length, index, seed=7, sources=sources)
        # RULER: prompt + tokens_to_generate <= max_seq_length
        assert len(sample.prompt) + sample.max_new_tokens <= length
        text = tok.decode(sample.prompt)
        for ref in sample.references:
            assert ref in text, (task, ref)
        assert score(" ".join(sample.references), sample.references, sample.metric) == 100.0
        assert score("no idea at all", sample.references, sample.metric) == 0.0
        again = generate(task, tok, length, index, seed=7, sources=sources)
        assert again.prompt == sample.prompt and again.references == sample.references
    other = generate(task, tok, length, 0, seed=8, sources=sources)
    assert other.prompt != generate(task, tok, length, 0, seed=7, sources=sources).prompt


@pytest.mark.parametrize("length", [4096, 32768, 131072])
def test_ruler_invariants_for_all_tasks_at_long_lengths(length, sources):
    """Byte-tokenizer prompts of every task at 4K, 32K and 128K: within length minus the
    budget, haystacks filled to within one unit, references present, keys distinct."""
    tok = ByteTokenizer()
    for task in TASKS:
        sample = generate(task, tok, length, 0, seed=3, sources=sources)
        budget = {"vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32, "qa_2": 32}.get(task, 128)
        assert sample.max_new_tokens == budget
        room = length - budget - len(sample.prompt)
        assert room >= 0, task
        text = tok.decode(sample.prompt)
        assert all(ref in text for ref in sample.references), task
        if task in ("niah_single_1", "vt"):  # the noise haystack is full to the line
            assert room < len(GRASS) + 2, (task, room)
        if task == "fwe":  # the coded text grows by whole words
            assert room < 40, room
        if task in NIAH and task != "niah_multivalue":  # (one key, four values)
            keys = [k for k, _ in NEEDLE.findall(text)]
            assert len(keys) == len(set(keys)), task


def test_niah_multikey_2_distractor_keys_never_repeat_the_queried_key(sources):
    tok = ByteTokenizer()
    for index in range(6):
        text = tok.decode(generate("niah_multikey_2", tok, 16384, index, 0, sources).prompt)
        keys = [k for k, _ in NEEDLE.findall(text)]
        query = re.search(r"What (?:is|are all) the special magic numbers? for (\S+) ", text)[1]
        assert keys.count(query) == 1 and len(keys) == len(set(keys)) and len(keys) > 100


def test_niah_templates_wording_and_joins(sources):
    tok = ByteTokenizer()
    singular = {  # RULER: one needle asked once -> "A ... is ... What is the ... number"
        "niah_single_1": "number",
        "niah_single_2": "number",
        "niah_single_3": "uuid",
        "niah_multikey_1": "number",
        "niah_multikey_2": "number",
        "niah_multikey_3": "uuid",
    }
    for task, kind in singular.items():
        text = tok.decode(generate(task, tok, 4096, 1, 0, sources).prompt)
        head = (
            f"A special magic {kind} is hidden within the following text. Make sure to memorize "
            f"it. I will quiz you about the {kind} afterwards.\n"
        )
        query = re.search(rf"\nWhat is the special magic {kind} for (\S+) mentioned", text)[1]
        tail = (
            f"\nWhat is the special magic {kind} for {query} mentioned in the provided text? "
            f"The special magic {kind} for {query} mentioned in the provided text is"
        )
        assert text.startswith(head) and text.endswith(tail), task
        context = between(text, head, tail)
        needles = dict(NEEDLE.findall(text))
        assert f"special magic {kind}s for {query} is: {needles[query]}." in text  # plural
        if task in ("niah_single_1", "niah_multikey_2", "niah_multikey_3"):
            lines = context.split("\n")  # "\n"-joined lines: grass or needles, nothing cut
            assert all(line == GRASS or NEEDLE.fullmatch(line) for line in lines), task
        else:  # essay: needles between sentences, " "-joined
            assert re.search(rf"\. One of the special magic {kind}s for \S+ is: \S+\. ", context)

    multiquery = generate("niah_multiquery", tok, 4096, 0, 0, sources)
    text = tok.decode(multiquery.prompt)
    assert text.startswith("Some special magic numbers are hidden within the following text.")
    asked = re.search(r"What are all the special magic numbers for (.+?) mentioned in", text)[1]
    keys = dict(NEEDLE.findall(text))
    queried = [k for k in keys if k in asked]
    order = sorted(queried, key=asked.index)
    assert len(order) == 4
    assert asked == f"{order[0]}, {order[1]}, {order[2]}, and {order[3]}"  # RULER's join
    assert multiquery.references == [keys[k] for k in order]
    multivalue = tok.decode(generate("niah_multivalue", tok, 4096, 0, 0, sources).prompt)
    assert "What are all the special magic numbers for" in multivalue


def cwe_lists(text: str) -> list[list[str]]:
    """The numbered lists of a cwe prompt, checked to be numbered 1, 2, 3, ... in order."""
    lists = re.findall(r"most often\.\n(.*?)\nQuestion:", text, re.S)
    words = []
    for listed in lists:
        pairs = re.findall(r"(\d+)\. (\S+)", listed)
        assert [int(n) for n, _ in pairs] == list(range(1, len(pairs) + 1))
        words.append([w for _, w in pairs])
    return words


@pytest.mark.parametrize(
    ("length", "common", "uncommon", "example_common", "example_uncommon"),
    [(8192, 30, 3, 10, 3), (2048, 6, 1, 3, 1)],
)
def test_cwe_frequencies_and_one_shot_example(
    length, common, uncommon, example_common, example_uncommon, sources
):
    """RULER: freq_cw/freq_ucw 30/3 from 4K up and 6/1 below; the one-shot example has 10
    common words repeated 10/3 times (3/1 below 4K), followed by its answer."""
    tok = ByteTokenizer()
    sample = generate("cwe", tok, length, 0, 0, sources)
    text = tok.decode(sample.prompt)
    example, main = cwe_lists(text)
    counts = Counter(main)
    assert sorted(sample.references) == sorted(w for w, c in counts.items() if c == common)
    assert set(counts.values()) == {common, uncommon} and len(counts) > 10
    shown = Counter(example)
    top = [w for w, c in shown.items() if c == example_common]
    assert len(top) == 10 and set(shown.values()) == {example_common, example_uncommon}
    answer = " ".join(f"{i + 1}. {w}" for i, w in enumerate(top))
    # the example's answer lists its 10 common words (in any order) before the task itself
    shown_answer = re.search(r"in the list are:(.*?)\nBelow is a numbered list", text, re.S)[1]
    assert sorted(re.findall(r"\d+\. (\S+)", shown_answer)) == sorted(top)
    assert len(shown_answer) == len(answer)


def test_vt_chain_and_one_shot_example(sources):
    tok = ByteTokenizer()
    sample = generate("vt", tok, 4096, 0, 0, sources)
    text = tok.decode(sample.prompt)
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text."
    assert text.count(head) == 2 and text.startswith(head)
    example, task = text.split("\n\n\n\n")
    # the example: a 3-letter chain of 4 hops, answered
    value, first = re.search(r"VAR ([A-Z]{3}) = (\d{5})", example)[2], None
    first = re.search(r"VAR ([A-Z]{3}) = \d{5}", example)[1]
    chain = [first]
    while m := re.search(rf"VAR ([A-Z]{{3}}) = VAR {chain[-1]} ", example):
        chain.append(m[1])
    assert len(chain) == 5
    assert example.endswith(f"they are:  {' '.join(chain)}") and f"value {value} in" in example
    # the task: a 5-letter chain in order, asked with the RULER answer prefix
    value = re.search(r"VAR [A-Z]{5} = (\d{5})", task)[1]
    assert task.endswith(
        f"Answer: According to the chain(s) of variable assignment in the text above, 5 "
        f"variables are assigned the value {value}, they are: "
    )
    positions = [task.index(f"VAR {sample.references[0]} = {value}")]
    for a, b in zip(sample.references, sample.references[1:], strict=False):
        positions.append(task.index(f"VAR {b} = VAR {a} "))
    assert positions == sorted(positions)


@pytest.mark.parametrize("length", [4096, 16384])
def test_fwe_counts_follow_the_zeta_distribution(length, sources):
    """RULER: the word of rank k appears int(N k^-2 / zeta(2)) times, rank 1 is the noise
    "...", the answer is ranks 2-4."""
    tok = ByteTokenizer()
    sample = generate("fwe", tok, length, 0, 0, sources)
    text = tok.decode(sample.prompt)
    context = between(text, "Find the three most frequently appeared coded words. ", "\nQuestion:")
    counts = Counter(context.split(" "))
    ranked = sorted(counts, key=counts.get, reverse=True)
    assert ranked[0] == "..." and sample.references == ranked[1:4]
    assert all(re.fullmatch(r"[a-z]{6}", w) for w in ranked[1:])
    zeta2 = math.pi**2 / 6
    dots = counts["..."]  # int(N / zeta(2)): N lies in [dots * zeta, (dots + 1) * zeta)
    observed = sorted(counts.values(), reverse=True)
    matches = []
    for n in range(math.floor(dots * zeta2), math.ceil((dots + 1) * zeta2) + 1):
        vocab = (length - 50) // 50  # RULER: (max_seq_length - tokens_to_generate) // 50
        expected = [int(n * k**-2 / zeta2) for k in range(1, vocab + 1)]
        if [c for c in expected if c > 0] == observed:
            matches.append(n)
    assert matches


def qa_documents(text: str) -> list[tuple[int, str]]:
    context = between(text, "The following are given documents.\n\n", "\n\nAnswer the question")
    return [
        (int(i), d)
        for i, d in re.findall(r"Document (\d+):\n(.*?)(?=\n\nDocument |$)", context, re.S)
    ]


def test_qa_documents_distinct_numbered_in_order_related_first(sources):
    """RULER's qa: distinct documents, the question's article first among distractors, the
    gold document shuffled among them, numbered 1..N in prompt order."""
    tok = ByteTokenizer()
    golds, sizes = set(), set()
    for index in range(8):
        sample = generate("qa_1", tok, 700, index, 0, sources)
        text = tok.decode(sample.prompt)
        docs = qa_documents(text)
        assert [i for i, _ in docs] == list(range(1, len(docs) + 1))
        assert len({d for _, d in docs}) == len(docs)
        article = re.search(r"place(\d+)x", text.rsplit("Question:", 1)[1])[1]
        answer = sample.references[0]
        gold = [i for i, d in docs if answer in d]
        assert len(gold) == 1
        assert all(d.startswith(f"Article {article} ") for _, d in docs)  # related first
        golds.add(gold[0])
        sizes.add(len(docs))
    assert len(golds) > 1 and max(sizes) < 6  # the gold moves; fewer docs than the article
    long = tok.decode(generate("qa_1", tok, 4096, 0, 0, sources).prompt)
    articles = {d.split(" ")[1] for _, d in qa_documents(long)}
    assert len(articles) > 1 and len(qa_documents(long)) > 6  # then other articles
    hotpot = generate("qa_2", tok, 1024, 3, 0, sources)
    docs = [d for _, d in qa_documents(tok.decode(hotpot.prompt))]
    assert "Company3\nCompany3 was founded by person3. It grew." in docs
    assert "Other3\nUnrelated facts about weather3. " in docs  # its own distractor goes in


def test_qa_without_local_data_is_skipped_with_the_reason():
    sources = build_sources(TEXTS)
    with pytest.raises(TaskSkipped, match="squad_path"):
        generate("qa_1", ByteTokenizer(), 1000, 0, 0, sources)
    sources = build_sources(TEXTS, hotpotqa_path="/no/such/hotpot.json")
    with pytest.raises(TaskSkipped, match=r"/no/such/hotpot\.json"):
        generate("qa_2", ByteTokenizer(), 1000, 0, 0, sources)


def test_scoring_part_metric():
    assert score("It is Paris, I think", ["paris", "Lyon"], "part") == 100.0
    assert score("Rome", ["paris", "Lyon"], "part") == 0.0
    assert score("paris and lyon", ["Paris", "Lyon", "Nice"], "all") == pytest.approx(200 / 3)
