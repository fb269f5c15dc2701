"""The lm_eval stage: lm-evaluation-harness itself, over a multiple-choice task the test writes,
scored with our model. The expected scores are computed here by hand, as the harness defines
them: a choice's log-likelihood is the sum of log p(token) of " " + choice after the question;
acc picks the largest, acc_norm the largest per character of the choice."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import torch

from ltstudy.checkpoint import export_model
from ltstudy.config import ConfigError, validate_study
from ltstudy.data.tokenizer import ByteTokenizer, get_tokenizer
from ltstudy.evaluate.lm_eval import HarnessLM, run_tasks
from ltstudy.models.transformer import build_model
from ltstudy.parallel.distributed import World
from ltstudy.results.schemas import TABLES, write_table
from tests.conftest import launch_stage

QUESTIONS = [
    ("The capital of France is", ["Paris", "a lake", "blue", "seventeen cats"]),
    ("Water boils at", ["100 degrees", "noon", "x"]),
    ("A cat says", ["meow", "woof", "the quick brown fox"]),
    ("Two plus two is", ["four", "five", "a number", "22"]),
    ("Snow is", ["white", "hot", "loud", "made of cheese"]),
    ("The sun rises in the", ["east", "west", "drawer"]),
    ("Bees make", ["honey", "bread", "noise", "no sense at all"]),
    ("A week has", ["seven days", "a king", "9"]),
    ("Fish live in", ["water", "trees", "a deep blue sea"]),
    ("Ice is", ["cold", "warm", "a verb"]),
]


def hand_loglikelihood_ids(model: torch.nn.Module, context: list[int], cont: list[int]) -> float:
    """Sum of log p(cont | context), from our model's per-token losses."""
    ids = context + cont
    inputs = torch.tensor([ids[:-1]])
    labels = torch.tensor([[-100] * (len(context) - 1) + cont])
    with torch.no_grad():
        return -float(model.token_losses(inputs, labels).sum())


def hand_loglikelihood(model: torch.nn.Module, context: str, continuation: str) -> float:
    return hand_loglikelihood_ids(model, list(context.encode()), list(continuation.encode()))


def study_config(root: Path) -> dict:
    """One micro run that trains and runs lm_eval on the two tasks of `root/tasks`."""
    return {
        "launcher": "local",
        "results_dir": str(root / "results"),
        "data": {"corpus": "embedded", "max_bytes": 100000},
        "defaults": {
            "size": "micro",
            "context": 64,
            "train": {"steps": 1, "batch_size": 1, "dtype": "fp32"},
            "evaluate": {
                "ruler": {"tasks": ["niah_single_1"], "lengths": [4096]},
                "lm_eval": {
                    "tasks": ["tiny_mc", "tiny_absent"],
                    "include_path": str(root / "tasks"),
                    "batch_size": 3,  # batches of unequal lengths: padding must not matter
                },
            },
            "resources": {"evaluate": {"gpu": 0, "cpus_per_task": 1}},
        },
        "studies": [
            {"name": "short", "stages": ["train", "lm_eval"], "grid": {"variant": ["full"]}}
        ],
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A randomly initialised micro model saved as a run's final model, a JSONL task over it
    and one whose file is absent, and the scores computed by hand."""
    root = tmp_path_factory.mktemp("lm_eval")
    raw = study_config(root)
    _, runs = validate_study(raw)
    (spec,) = runs.values()
    model = build_model(spec["model"], seed=3).eval()
    Path(spec["run_dir"]).mkdir(parents=True)
    metadata = {"model_config": json.dumps(spec["model"]), "config_hash": spec["config_hash"]}
    export_model(model, Path(spec["run_dir"]) / "model.safetensors", metadata, World())

    lls = [[hand_loglikelihood(model, q, " " + c) for c in choices] for q, choices in QUESTIONS]
    per_char = [
        [v / len(c) for v, c in zip(s, choices, strict=True)]
        for s, (_, choices) in zip(lls, QUESTIONS, strict=True)
    ]
    for scores in lls + per_char:  # no near-ties, so rounding cannot flip an argmax
        top = sorted(scores)[-2:]
        assert top[1] - top[0] > 1e-4

    def argmax(values):
        return max(range(len(values)), key=values.__getitem__)

    # Labels that make acc and acc_norm differ: the best choice, the best per character, or
    # neither, in turn.
    best, best_norm = [argmax(s) for s in lls], [argmax(s) for s in per_char]
    labels = [
        (best[i], best_norm[i], min({0, 1, 2} - {best[i], best_norm[i]}))[i % 3]
        for i in range(len(QUESTIONS))
    ]
    docs = [
        {"question": q, "choices": c, "label": label}
        for (q, c), label in zip(QUESTIONS, labels, strict=True)
    ]
    data = root / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = root / "tasks"
    tasks.mkdir()
    yaml = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""
    (tasks / "tiny_mc.yaml").write_text(yaml.format(name="tiny_mc", path=data))
    (tasks / "tiny_absent.yaml").write_text(
        yaml.format(name="tiny_absent", path=root / "no_such.jsonl")
    )

    acc = sum(b == label for b, label in zip(best, labels, strict=True)) / len(docs)
    acc_norm = sum(b == label for b, label in zip(best_norm, labels, strict=True)) / len(docs)
    return SimpleNamespace(spec=spec, model=model, lls=lls, acc=acc, acc_norm=acc_norm)


def test_stage_accuracy_equals_the_hand_computation(setup):
    """The stage as the workflow launches it: lm-evaluation-harness's accuracy over our model
    equals acc and acc_norm computed by hand; a task whose data file is absent is a skipped
    row with the reason, and does not stop the other."""
    assert 0 < setup.acc < 1 and setup.acc != setup.acc_norm  # the comparison can tell
    out = str(Path(setup.spec["run_dir"]) / "lm_eval.parquet")
    launch_stage("lm_eval", setup.spec, {"table": out}, launcher="debug")
    table = pl.read_parquet(out)
    assert table.schema == TABLES["lm_eval"]
    ok = table.filter(pl.col("task") == "tiny_mc")
    values = {m: v for m, v in ok.select("metric", "value").iter_rows()}
    assert values == {"acc": pytest.approx(setup.acc), "acc_norm": pytest.approx(setup.acc_norm)}
    assert ok["samples"].to_list() == [len(QUESTIONS)] * 2
    assert ok["num_fewshot"].to_list() == [0, 0]
    acc_row = ok.filter(pl.col("metric") == "acc").row(0, named=True)
    # The harness's stderr of a mean of 0/1 scores: the sample standard deviation / sqrt(n).
    n = len(QUESTIONS)
    assert acc_row["stderr"] == pytest.approx(
        math.sqrt(setup.acc * (1 - setup.acc) * n / (n - 1) / n)
    )
    absent = table.filter(pl.col("task") == "tiny_absent").row(0, named=True)
    assert absent["status"] == "skipped" and "no_such.jsonl" in absent["reason"]
    assert absent["value"] is None


def test_each_choice_loglikelihood_equals_the_hand_sum(setup):
    """Per request, what the harness records from our wrapper is the hand computation."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = HarnessLM(setup.model, get_tokenizer("bytes"), max_length=64, batch_size=4)
    manager = TaskManager(include_path=setup.spec["evaluate"]["lm_eval"]["include_path"])
    results = simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=manager)
    samples = sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    got = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    assert got == [[pytest.approx(v, abs=1e-4) for v in row] for row in setup.lls]


def test_greedy_generation_through_the_cache_stops_at_the_stop_string(setup):
    """generate_until equals greedy decoding by full forward passes, cut at the stop string."""
    model, prompt = setup.model, "The capital of France is"
    ids = list(prompt.encode())
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    new = ids[len(prompt.encode()) :]
    assert 256 not in new  # no end of document: the stop string is what cuts
    text = bytes(new).decode(errors="replace")
    stop = next(ch for ch in text[2:] if ch.isascii())
    lm = HarnessLM(model, get_tokenizer("bytes"), max_length=64)
    request = SimpleNamespace(args=(prompt, {"until": [stop], "max_gen_toks": 12}))
    assert lm.generate_until([request]) == [text.split(stop)[0]]


def test_rolling_loglikelihood_scores_each_token_once_in_windows(setup):
    """A 100-byte text at max_length 64, by the harness's rolling-window rule: the first window
    predicts bytes 0-63 after the end-of-document token, the second bytes 64-99, each from the
    64 bytes before the window's last byte."""
    model, text = setup.model, "0123456789 the quick brown fox jumps over the lazy dog " * 2
    ids = list(text.encode())[:100]
    text = bytes(ids).decode()

    def total(inputs: list[int], labels: list[int]) -> float:
        with torch.no_grad():
            return -float(model.token_losses(torch.tensor([inputs]), torch.tensor([labels])).sum())

    first = total([256, *ids[:63]], ids[:64])
    second = total(ids[35:99], [-100] * 28 + ids[64:100])
    lm = HarnessLM(model, get_tokenizer("bytes"), max_length=64, batch_size=2)
    (got,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    assert got == pytest.approx(first + second, abs=1e-4)


def test_requests_start_with_bos_where_the_tokenizer_has_one(setup):
    """As the harness's Hugging Face model encodes them: the BOS before the context (Llama-3),
    none inside the continuation, and BOS as the context of an empty one."""

    class WithBos(ByteTokenizer):
        bos_id = 257

        def with_bos(self, ids):
            return [257, *ids]

    lm = HarnessLM(setup.model, WithBos(), max_length=64)
    assert lm._encode_pair("ab", " c") == ([257, 97, 98], [32, 99])
    assert lm.prefix_token_id == 257
    plain = HarnessLM(setup.model, ByteTokenizer(), max_length=64)
    assert plain._encode_pair("ab", " c") == ([97, 98], [32, 99])
    assert plain.prefix_token_id == 256
    # the empty context is [BOS]: the same score as scoring after BOS by hand
    (got,) = lm.loglikelihood([SimpleNamespace(args=("", "ab"))])
    assert got[0] == pytest.approx(hand_loglikelihood_ids(setup.model, [257], [97, 98]), abs=1e-4)


def test_unknown_task_fails_naming_the_field(setup):
    lm = HarnessLM(setup.model, get_tokenizer("bytes"), max_length=64)
    cfg = {**setup.spec["evaluate"]["lm_eval"], "tasks": ["no_such_task_anywhere"]}
    with pytest.raises(ValueError, match=r"evaluate\.lm_eval\.tasks.*no_such_task_anywhere"):
        run_tasks(lm, cfg)


def test_lm_eval_is_opt_in_and_needs_a_trained_model(tmp_path):
    raw = study_config(tmp_path)
    del raw["studies"][0]["stages"]
    _, runs = validate_study(raw)
    assert all("lm_eval" not in spec["stages"] for spec in runs.values())
    raw["studies"][0]["stages"] = ["lm_eval"]
    with pytest.raises(ConfigError, match=r"`stages`.*lm_eval.*`train` must be a stage"):
        validate_study(raw)
    raw["studies"][0]["stages"] = ["train", "lm_eval"]
    raw["defaults"]["evaluate"]["lm_eval"]["limit"] = 0
    with pytest.raises(ConfigError, match=r"evaluate\.lm_eval\.limit"):
        validate_study(raw)


def test_report_shows_scores_and_skipped_tasks(tmp_path):
    from ltstudy.report.page import build_report

    base = {"run_id": "s/full", "study": "s", "variant": "full", "size": "micro", "context": 64}
    ok = {"task": "piqa", "subtask": "piqa", "filter": "none", "stderr": 0.01, "num_fewshot": 0}
    rows = [
        {**base, **ok, "metric": "acc", "value": 0.625, "samples": 8, "status": "ok"},
        {**base, "task": "mmlu", "subtask": "mmlu", "status": "skipped", "reason": "not cached"},
    ]
    write_table("lm_eval", rows, tmp_path / "results" / "lm_eval.parquet")
    page = build_report(tmp_path / "results", tmp_path / "reports").read_text()
    section = page.split("Short-context tasks")[1].split("<h2>")[0]
    assert "62.500" in section and "mmlu: skipped (not cached)" in section
