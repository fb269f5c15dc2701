"""Config validation: defaults are filled, runs expand, and bad values fail naming the field."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ltstudy.config import ConfigError, expand_runs, load_config, slug, validate_config
from ltstudy.models.variants import VARIANTS
from tests.conftest import ROOT, TINY_QWEN3, snakemake, write_config

SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def test_micro_config_expands(micro_raw):
    config = validate_config(micro_raw)
    runs = expand_runs(config)
    assert list(runs) == ["micro/full-micro-64", "micro/mamba2-micro-64", "micro/ttt_swa-micro-64"]
    spec = runs["micro/ttt_swa-micro-64"]
    assert spec["train"]["lr"] == 3.0e-3 and spec["train"]["weight_decay"] == 0.1  # default
    assert spec["model"]["swa_window"] == 8 and spec["model"]["ttt"]["layers"] == [0, 1]
    assert runs["micro/full-micro-64"]["model"]["ttt"] is None
    assert spec["stages"] == ["train", "perplexity", "passkey", "ruler", "lm_eval", "throughput"]


def test_shipped_configs_are_valid():
    demo = expand_runs(load_config(ROOT / "config" / "demo.yaml"))
    assert {s["variant"] for s in demo.values()} == set(VARIANTS)
    retrieval = {s["variant"]: s for s in demo.values() if s["study"] == "retrieval"}
    assert set(retrieval) == {"full", "swa"}  # the demo's passkey contrast (issue 4, item 2)
    for spec in retrieval.values():
        assert spec["stages"] == ["train", "passkey"]
        assert spec["data"]["synthetic"]["mix"] == {
            "recall": 0,
            "repeat": 0,
            "chars": 0,
            "passkey": 1,
        }
        assert spec["train"]["windows"] == "one_document" and spec["train"]["schedule"] == "wsd"
        assert max(spec["evaluate"]["passkey"]["lengths"]) > spec["context"]
    # swa continues from full's weights: the window is the only difference
    assert retrieval["swa"]["train"]["init_from"] == retrieval["full"]["run_id"]
    full = expand_runs(load_config(ROOT / "config" / "config.yaml"))
    sizes = {s["size"] for s in full.values()}
    contexts = {s["context"] for s in full.values()}
    assert sizes == {"500M", "1.5B", "4B", "8B", "14B"}
    assert {32768, 65536, 131072, 262144, 524288, 1048576} <= contexts
    assert full["scratch/ttt_swa-1.5B-32k"]["train"]["lr"] == 3.0e-4  # size_overrides
    assert full["scratch/ttt_swa-500M-32k"]["train"]["lr"] == 5.0e-4


def test_config_hash_ignores_resources_and_evaluation(micro_raw):
    a = expand_runs(validate_config(micro_raw))["micro/full-micro-64"]
    micro_raw["defaults"]["resources"]["train"]["runtime"] = 99
    micro_raw["defaults"]["evaluate"]["passkey"]["trials"] = 7
    b = expand_runs(validate_config(micro_raw))["micro/full-micro-64"]
    assert a["config_hash"] == b["config_hash"]
    micro_raw["defaults"]["train"]["lr"] = 1e-3
    c = expand_runs(validate_config(micro_raw))["micro/full-micro-64"]
    assert c["config_hash"] != a["config_hash"]


@pytest.mark.parametrize(
    "mutate, field, words",
    [
        (
            lambda c: c["studies"][0]["grid"].update(variant=["full", "fulll"]),
            "`variant`",
            "unknown variant 'fulll'",
        ),
        (lambda c: c["defaults"].update(size="3B"), "`size`", "unknown size '3B'"),
        (lambda c: c["defaults"]["train"].update(lr=-0.001), "`defaults.train.lr`", "-0.001"),
        (
            lambda c: c["studies"][0].update(overrides={"train": {"lr": -1}}),
            "`studies[0].overrides.train.lr`",
            "-1",
        ),
        (lambda c: c["studies"][0]["grid"].update({"train.lr": [-1.0]}), "`train.lr`", "-1.0"),
        (lambda c: c["defaults"]["train"].update(stepz=3), "`defaults.train`", "stepz"),
        (lambda c: c.update(launcher="kubernetes"), "`launcher`", "kubernetes"),
        (lambda c: c["data"].update(corpus="/no/such/folder"), "`data.corpus`", "/no/such/folder"),
        (
            lambda c: c["defaults"]["evaluate"]["passkey"].update(lengths=[40]),
            "`evaluate.passkey.lengths`",
            "40",
        ),
        (
            lambda c: c["defaults"]["train"].update(micro_batch_size=3),
            "`train.micro_batch_size`",
            "3",
        ),
        (
            lambda c: c["data"].update(synthetic={"fraction": 0.5, "mix": {"recall": 0}}),
            "`data.synthetic.mix`",
            "every weight is 0",
        ),
        (
            lambda c: c["studies"][0].update(data={"synthetic": {"mix": {"chars": -1}}}),
            "`synthetic.mix.chars`",
            "-1",
        ),
        (
            lambda c: c["defaults"].setdefault("train", {}).update(answer_loss_weight=5),
            "`train.answer_loss_weight`",
            "no",
        ),
        (
            lambda c: (
                c["defaults"].setdefault("train", {}).update(answer_loss_weight=5),
                c["data"].update(synthetic={"fraction": 0.5, "mix": {"recall": 0, "chars": 1}}),
            ),
            "`train.answer_loss_weight`",
            "recall and passkey",
        ),
        (
            lambda c: c["defaults"].setdefault("model", {}).update(kernels="triton"),
            "`model.kernels`",
            "resources.train.gpu is 0",
        ),
        (
            lambda c: c["defaults"].setdefault("model", {}).update(kernels="cuda"),
            "model.kernels",
            "cuda",
        ),
    ],
)
def test_bad_values_name_the_field(micro_raw, mutate, field, words):
    mutate(micro_raw)
    with pytest.raises(ConfigError) as err:
        validate_config(micro_raw)
    assert field in str(err.value) and words in str(err.value)


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("studies: [unclosed")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config(bad)


def test_cli_validate_reports_bad_config(micro_raw, tmp_path, capsys):
    from ltstudy.cli import main

    micro_raw["defaults"]["size"] = "huge"
    path = write_config(tmp_path / "c.yaml", micro_raw)
    assert main(["validate", str(path)]) == 2
    assert "unknown size 'huge'" in capsys.readouterr().err


def test_ruler_lengths_too_short_for_a_task_fail_at_once(micro_raw):
    micro_raw["defaults"]["evaluate"]["ruler"]["lengths"] = [300]
    with pytest.raises(ConfigError, match=r"evaluate\.ruler\.lengths.*300 tokens cannot hold"):
        validate_config(micro_raw)


@pytest.mark.parametrize(
    "variant, mutate, field",
    [
        ("ttt_swa", lambda m: m["ttt"].update(chunk_size=16), "`model.ttt.chunk_size`: 16"),
        ("lact", lambda m: m.update(lact={"chunk_size": 16}), "`model.lact.chunk_size`: 16"),
    ],
)
def test_fast_weight_chunk_longer_than_the_window_fails(micro_raw, variant, mutate, field):
    """A token late in a chunk reaches the chunk's first tokens only through the window
    (the fast weights are written when the chunk ends): chunk <= swa_window (8 at micro)."""
    micro_raw["studies"][0]["grid"]["variant"] = [variant]
    mutate(micro_raw["defaults"]["model"])
    with pytest.raises(ConfigError) as err:
        validate_config(micro_raw)
    message = str(err.value)
    assert f"micro/{variant}-micro-64" in message and field in message
    assert "`model.swa_window` 8" in message
    mutate_to_window = {"ttt_swa": {"ttt": {"chunk_size": 8}}, "lact": {"lact": {"chunk_size": 8}}}
    micro_raw["defaults"]["model"].update(mutate_to_window[variant])
    validate_config(micro_raw)  # a chunk as long as the window is fine


def test_document_reset_knows_the_tokenizers_end_of_document(micro_raw):
    from ltstudy.data.tokenizer import ByteTokenizer

    micro_raw["defaults"]["model"]["ttt"]["reset_at_documents"] = True
    ttt = expand_runs(validate_config(micro_raw))["micro/ttt_swa-micro-64"]["model"]["ttt"]
    assert ttt["document_separator"] == ByteTokenizer.eos_id
    assert ttt["clip_order"] == "before_eta" and ttt["clip_at"] == "inference"


def test_slug_keeps_safe_values_and_tells_apart_lossy_ones():
    assert slug(0.001) == "0.001" and slug("cosine") == "cosine" and slug(True) == "True"
    values = ["a/b", "a_b", "a b", "../a/b", "a//b", "x" * 100, "y" + "x" * 99]
    slugs = [slug(v) for v in values]
    assert len(set(slugs)) == len(values)
    assert all(SAFE_NAME.fullmatch(s) and len(s) <= 49 for s in slugs)
    assert slug("a_b") == "a_b" and slug("a/b").startswith("a_b_")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny Qwen3 checkpoint folders (config.json is all validation reads), named with a
    space, and reached through paths with '..', '//' and a trailing '/'."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("ckpts")
    for name in ("ckpt a", "ckpt_a"):
        config = transformers.Qwen3Config(**TINY_QWEN3)
        config.save_pretrained(root / name)
    (root / "sub").mkdir()
    return [
        str(root / "ckpt a"),
        str(root / "ckpt_a"),
        f"{root}/sub/../ckpt a",
        f"{root}//ckpt_a/",
    ]


def pretrained_grid(micro_raw, checkpoints):
    micro_raw["studies"] = [
        {
            "name": "continual",
            "stages": ["train", "passkey"],
            "overrides": {"size": "qwen3", "train": {"steps": 2}},
            "grid": {"variant": ["full"], "model.pretrained": checkpoints},
        }
    ]
    return micro_raw


def test_grid_over_paths_gives_distinct_safe_run_folders(micro_raw, checkpoints, tmp_path):
    """Issue 13, item 6: grid values with '/', '..' and spaces went into run names unescaped,
    so a run folder could leave results/runs and Snakemake's `run` wildcard ([^/]+) never
    matched it. Now each value is slugged, with a hash where that loses characters."""
    runs = expand_runs(validate_config(pretrained_grid(micro_raw, checkpoints)))
    assert len(runs) == len(checkpoints)
    assert len({spec["run_dir"] for spec in runs.values()}) == len(checkpoints)
    for spec in runs.values():
        assert SAFE_NAME.fullmatch(spec["name"]), spec["name"]
        assert Path(spec["run_dir"]).parent == Path("results/runs/continual")
    assert sorted(spec["model"]["pretrained"] for spec in runs.values()) == sorted(checkpoints)

    # the real workflow plans every job of such a config (it failed with MissingInputException)
    write_config(tmp_path / "c.yaml", micro_raw)
    out = snakemake(tmp_path, "-n", "--configfile=c.yaml", "all").stdout
    for spec in runs.values():
        assert f"{spec['run_dir']}/model.safetensors" in out


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda c: c["studies"][0].update(runs=[{"name": "../up"}]), "`studies[0].runs[0].name`"),
        (lambda c: c["studies"][0].update(name="a/b"), "`studies[0].name`"),
        (lambda c: c["defaults"].update(size="../x"), "`defaults.size`"),
    ],
)
def test_names_that_are_not_folder_names_fail(micro_raw, mutate, field):
    mutate(micro_raw)
    with pytest.raises(ConfigError, match=re.escape(field)):
        validate_config(micro_raw)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda c: c["defaults"]["train"].update(lr=NAN), "`defaults.train.lr`: nan"),
        (lambda c: c["defaults"]["train"].update(lr=INF), "`defaults.train.lr`: inf"),
        (lambda c: c["data"].update(validation_fraction=NAN), "`data.validation_fraction`"),
        (
            lambda c: c["studies"][0]["grid"].update({"train.lr": [0.001, -INF]}),
            "`studies[0].grid.train.lr[1]`: -inf",
        ),
    ],
)
def test_non_finite_numbers_fail_naming_the_field(micro_raw, tmp_path, mutate, field):
    """Issue 13, item 9: NaN passes every `minimum` of the schema (and infinity passes a
    minimum without a maximum), so `lr: .nan` validated and trained on NaN."""
    mutate(micro_raw)
    path = write_config(tmp_path / "c.yaml", micro_raw)
    assert ".nan" in path.read_text() or ".inf" in path.read_text()
    with pytest.raises(ConfigError, match=re.escape(field)) as err:
        load_config(path)
    assert "not a finite number" in str(err.value) and "c.yaml" in str(err.value)


DUPLICATE = """\
launcher: local
defaults:
  train:
    lr: 0.001
    steps: 3
    lr: 0.1
studies:
  - name: a
"""


def test_duplicate_yaml_keys_fail_naming_key_file_and_line(tmp_path):
    """Issue 13, item 9: YAML keeps the last of two equal keys without a word."""
    path = tmp_path / "dup.yaml"
    path.write_text(DUPLICATE)
    with pytest.raises(ConfigError, match=re.escape(f"{path}:6: duplicate key 'lr'")) as err:
        load_config(path)
    assert "line 4" in str(err.value)
    # a YAML merge key may override what it merges: that is not a duplicate
    merged = tmp_path / "merged.yaml"
    merged.write_text(
        "x-base: &base {lr: 0.001, steps: 3}\n"
        "defaults:\n  train:\n    <<: *base\n    lr: 0.002\n"
        "studies:\n  - name: a\n"
    )
    with pytest.raises(ConfigError, match="x-base"):  # unknown top-level key, not a duplicate
        load_config(merged)


def test_snakemake_rejects_duplicate_keys_in_its_config_files(tmp_path):
    (tmp_path / "dup.yaml").write_text(DUPLICATE)
    proc = snakemake(tmp_path, "-n", "--configfile=dup.yaml", "all", check=False)
    assert proc.returncode != 0
    assert "dup.yaml:6: duplicate key 'lr'" in proc.stdout + proc.stderr


def test_sliding_window_longer_than_the_training_context_fails(micro_raw):
    """Issue 13, item 9: a window longer than the context trains full attention."""
    micro_raw["studies"][0]["grid"]["variant"] = ["swa"]
    micro_raw["defaults"]["model"]["swa_window"] = 128
    with pytest.raises(ConfigError, match=r"micro/swa-micro-64: config field `model\.swa_window`"):
        validate_config(micro_raw)
    micro_raw["studies"][0]["stages"] = ["throughput"]  # untrained: the context is no limit
    validate_config(micro_raw)
    micro_raw["studies"][0].pop("stages")
    micro_raw["defaults"]["model"]["swa_window"] = 64  # as long as the context is fine
    validate_config(micro_raw)


@pytest.mark.parametrize(
    "variant, model, field",
    [
        ("ttt_full", {"ttt": {"chunk_size": 64}}, "`model.ttt.chunk_size`: 64"),
        ("lact", {"swa_window": 64, "lact": {"chunk_size": 64}}, "`model.lact.chunk_size`: 64"),
    ],
)
def test_fast_weight_chunk_as_long_as_the_context_fails(micro_raw, variant, model, field):
    """Issue 13, item 9: fast weights are written when a chunk ends and read by later chunks
    only; a chunk as long as the training context leaves them unused in training. A context
    that is not a multiple of the chunk is fine (the ops pad or skip the last write)."""
    micro_raw["studies"][0]["grid"]["variant"] = [variant]
    micro_raw["defaults"]["model"].update(model)
    with pytest.raises(ConfigError, match=re.escape(field)):
        validate_config(micro_raw)
    name = next(iter(model.keys() - {"swa_window"}))
    micro_raw["defaults"]["model"][name]["chunk_size"] = 48  # 64 is no multiple of 48: fine
    validate_config(micro_raw)


def test_editing_the_corpus_changes_the_data_id_and_the_runs(micro_raw, tmp_path):
    """Issue 13, item 7: the data id hashed the corpus path only, so an edited corpus kept
    its old shards and trained models. The corpus fingerprint now joins both hashes."""
    from ltstudy.data.corpus import corpus_fingerprint

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 400)
    micro_raw["data"]["corpus"] = str(corpus)
    before = expand_runs(validate_config(micro_raw))["micro/full-micro-64"]
    (corpus / "a.txt").write_text("A different text of another length. " * 300)
    corpus_fingerprint.cache_clear()
    after = expand_runs(validate_config(micro_raw))["micro/full-micro-64"]
    assert after["data_dir"] != before["data_dir"]
    assert after["config_hash"] != before["config_hash"]


def test_validation_reads_the_planner_counts_without_torch(tmp_path):
    """Issue 13, item 10: Snakemake parses the workflow, and so validates and plans every run,
    in its own process and again in every job's; importing torch for the planner's memory
    counts cost a second and 200 MB each time. Once counted, they come from the disk cache."""
    script = (
        "import sys; from ltstudy.config import load_study; "
        f"load_study({str(ROOT / 'tests' / 'configs' / 'micro.yaml')!r}); "
        "print('torch' in sys.modules)"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}  # counted afresh, then cached
    runs = [
        subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
        for _ in range(2)
    ]
    assert [r.stdout.strip() for r in runs] == ["True", "False"], runs[-1].stderr[-2000:]
