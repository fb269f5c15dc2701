"""RULER's 13 task generators: exact prompt length in the tokenizer, the answer in the prompt,
reproducible samples, RULER's scoring, and QA tasks skipped with a reason without their data."""

import json

import pytest

from ltstudy.data.corpus import embedded_documents
from ltstudy.data.tokenizer import ByteTokenizer
from ltstudy.evaluate.passkey_prompt import NEEDLE, depth_grid, passkey_prompt
from ltstudy.evaluate.ruler import TASKS, TaskSkipped, build_sources, generate, score

TEXTS = [doc.text for _, doc in zip(range(40), embedded_documents(), strict=False)]


def qa_files(tmp_path):
    squad = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": f"Paragraph {i} says that the capital of place{i} is city{i}.",
                        "qas": [
                            {
                                "question": f"What is the capital of place{i}?",
                                "is_impossible": False,
                                "answers": [{"text": f"city{i}"}],
                            }
                        ],
                    }
                    for i in range(20)
                ]
            }
        ]
    }
    hotpot = [
        {
            "question": f"Who founded company{i}?",
            "answer": f"person{i}",
            "context": [
                [f"Company{i}", [f"Company{i} was founded by person{i}. ", "It grew."]],
                [f"Other{i}", ["Unrelated facts about the weather. "]],
            ],
        }
        for i in range(20)
    ]
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    (tmp_path / "hotpot.json").write_text(json.dumps(hotpot))
    return str(tmp_path / "squad.json"), str(tmp_path / "hotpot.json")


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


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("tok_name", ["bytes", "bpe"])
@pytest.mark.parametrize("length", [700, 2048])
def test_generator(task, tok_name, length, tokenizers_under_test, tmp_path):
    tok = tokenizers_under_test[tok_name]
    sources = build_sources(TEXTS, *qa_files(tmp_path))
    for index in range(3):
        sample = generate(task, tok, length, index, seed=7, sources=sources)
        assert len(sample.prompt) == length
        text = tok.decode(sample.prompt)
        for ref in sample.references:
            assert ref in text, (task, ref)
        assert score(" ".join(sample.references), sample.references, sample.metric) == 100.0
        assert score("no idea at all", sample.references, sample.metric) == 0.0
        again = generate(task, tok, length, index, seed=7, sources=sources)
        assert again.prompt == sample.prompt and again.references == sample.references
    other = generate(task, tok, length, 0, seed=8, sources=sources)
    assert other.prompt != generate(task, tok, length, 0, seed=7, sources=sources).prompt


def test_answers_are_what_the_task_asks():
    tok = ByteTokenizer()
    sources = build_sources(TEXTS)
    multi = generate("niah_multivalue", tok, 1500, 0, 1, sources)
    assert len(multi.references) == 4 and multi.metric == "all"
    query = generate("niah_multiquery", tok, 1500, 0, 1, sources)
    assert len(query.references) == 4
    vt = generate("vt", tok, 1500, 0, 1, sources)
    assert len(vt.references) == 5 and all(len(v) == 5 and v.isupper() for v in vt.references)
    cwe = generate("cwe", tok, 3000, 0, 1, sources)
    listed = tok.decode(cwe.prompt).split("\n")[1].split()
    counts = {w: listed.count(w) for w in set(listed) if w.isalpha()}
    assert min(counts[w] for w in cwe.references) > max(
        c for w, c in counts.items() if w not in cwe.references
    )
    assert score("only " + cwe.references[0], cwe.references, "all") == 10.0


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


@pytest.mark.parametrize("tok_name", ["bytes", "bpe"])
@pytest.mark.parametrize("length", [300, 1000])
def test_passkey_prompt_length_key_and_needle_distance(tok_name, length, tokenizers_under_test):
    tok = tokenizers_under_test[tok_name]
    needle = tok.encode(NEEDLE.format(key=31415))
    distances = []
    for depth in depth_grid(5):
        prompt, distance = passkey_prompt(tok, length, depth, 31415)
        assert len(prompt) == length
        assert prompt[length - distance - len(needle) : length - distance] == needle
        assert "31415" not in tok.decode(prompt[length - distance :])
        distances.append(distance)
    assert distances == sorted(distances, reverse=True) and distances[0] > distances[-1]
    with pytest.raises(ValueError, match="shorter than the bare prompt"):
        passkey_prompt(tok, 10, 0.5, 31415)
