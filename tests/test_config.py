"""Config validation: defaults are filled, runs expand, and bad values fail naming the field."""

import pytest

from ltstudy.config import ConfigError, expand_runs, load_config, validate_config
from ltstudy.models.variants import VARIANTS
from tests.conftest import ROOT, write_config


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
