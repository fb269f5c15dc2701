"""Issue 15, validation: every error at once, the closest key for a misspelt one, `2e-3`
numbers and `32k` sizes read from real config files, and a reason with every refusal."""

import re

import pytest

from ltstudy.config import (
    ConfigError,
    context_label,
    load_config,
    load_study,
    parse_tokens,
    read_yaml,
)
from tests.conftest import snakemake, write_config


def test_every_schema_error_is_reported_at_once(micro_raw, tmp_path):
    micro_raw["launcher"] = "kubernetes"
    micro_raw["defaults"]["train"]["lr"] = -1
    micro_raw["defaults"]["evaluate"]["passkey"]["trials"] = 0
    micro_raw["studies"][0]["stages"] = ["train", "train"]
    path = write_config(tmp_path / "c.yaml", micro_raw)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: 4 errors" and len(err.value.problems) == 4
    fields = [re.search(r"config field `([^`]+)`", line)[1] for line in lines[1:]]
    assert fields == [  # sorted by field
        "defaults.evaluate.passkey.trials",
        "defaults.train.lr",
        "launcher",
        "studies[0].stages",
    ]
    assert "0 is less than the minimum of 1" in lines[1] and "-1" in lines[2]


def test_a_single_error_reads_as_one_line(micro_raw, tmp_path):
    micro_raw["defaults"]["train"]["lr"] = -1
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path / "c.yaml", micro_raw))
    assert str(err.value) == (
        f"{tmp_path / 'c.yaml'}: config field `defaults.train.lr`: -1 is less than or equal to "
        "the minimum of 0"
    )


def test_misspelt_keys_and_choices_suggest_the_closest(micro_raw, tmp_path):
    micro_raw["defaults"]["train"]["lerning_rate"] = 0.001
    micro_raw["defaults"]["train"]["stepz"] = 3
    micro_raw["studdies"] = micro_raw.pop("studies")
    micro_raw["launcher"] = "slurmm"
    micro_raw["defaults"]["evaluate"]["ruler"]["tasks"] = ["niah_singel_1"]
    micro_raw["defaults"]["train"]["micro_batch_size"] = "atuo"
    micro_raw["defaults"]["nonsense"] = 1
    path = write_config(tmp_path / "c.yaml", micro_raw)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "unknown key `lerning_rate` in `defaults.train`; did you mean `lr`?" in message
    assert "unknown key `stepz` in `defaults.train`; did you mean `steps`?" in message
    assert "unknown key `studdies` at the top level; did you mean `studies`?" in message
    assert "`launcher`: 'slurmm' is not one of" in message and "did you mean 'slurm'?" in message
    assert "did you mean 'niah_single_1'?" in message
    assert "`defaults.train.micro_batch_size`" in message and "did you mean 'auto'?" in message
    # nothing close: the keys that are allowed there
    assert "unknown key `nonsense` in `defaults` (known: variant, size, context," in message
    assert "'studies' is a required property" in message  # and the key it lacks


def test_unknown_variants_and_sizes_of_several_runs_are_reported_together(micro_raw):
    from ltstudy.config import validate_config

    micro_raw["studies"][0]["grid"]["variant"] = ["full", "fulll", "mamba"]
    micro_raw["studies"].append({"name": "other", "overrides": {"size": "mircro"}})
    with pytest.raises(ConfigError) as err:
        validate_config(micro_raw, source="c.yaml")
    message = str(err.value)
    assert message.startswith("c.yaml: 3 errors\n")
    assert "unknown variant 'fulll'; did you mean 'full'?" in message
    assert "unknown variant 'mamba'; did you mean 'mamba2'?" in message
    assert "studies[1] (other): config field `size`: unknown size 'mircro'" in message
    assert "did you mean 'micro'?" in message


def test_scientific_notation_reads_as_a_number(micro_raw, tmp_path):
    """PyYAML (YAML 1.1) reads 2e-3 and 1e1 as strings; the config loader reads YAML 1.2
    floats, and a whole float in an integer field is that integer."""
    text = write_config(tmp_path / "c.yaml", micro_raw).read_text()
    assert "lr: 0.003\n" in text and "steps: 12\n" in text
    path = tmp_path / "sci.yaml"
    path.write_text(
        text.replace("lr: 0.003\n", "lr: 2e-3\n").replace("steps: 12\n", "steps: 1e1\n")
    )
    _, runs = load_study(path)
    train = runs["micro/full-micro-64"]["train"]
    assert train["lr"] == 0.002 and isinstance(train["lr"], float)
    assert train["steps"] == 10 and isinstance(train["steps"], int)
    # quoted, it stays a string, refused saying why
    path.write_text(text.replace("lr: 0.003\n", "lr: '2e-3'\n"))
    with pytest.raises(
        ConfigError, match=re.escape(f"{path}: config field `defaults.train.lr`")
    ) as err:
        load_config(path)
    assert "'2e-3' is a string; write the number unquoted" in str(err.value)


def test_the_loader_reads_yaml_1_2_floats_only_unquoted(tmp_path):
    path = tmp_path / "n.yaml"
    path.write_text(
        "a: 1e5\nb: -1.5E+3\nc: .5e1\nd: +2e-3\ne: 3.0e-4\n"
        "f: '1e5'\ng: 2e\nh: e5\ni: 1e10x\nj: 12\n"
    )
    assert read_yaml(path) == {
        **{"a": 1e5, "b": -1500.0, "c": 5.0, "d": 0.002, "e": 3e-4},
        **{"f": "1e5", "g": "2e", "h": "e5", "i": "1e10x", "j": 12},
    }


def test_the_workflow_reads_scientific_notation_and_sizes_too(micro_raw, tmp_path):
    """Snakemake reads its config files as YAML 1.1 (2e-3 a string); the workflow takes the
    numbers as ltstudy's loader reads them, and a quoted one stays a string."""
    micro_raw["defaults"]["context"] = "1k"
    micro_raw["defaults"]["model"]["swa_window"] = 64
    text = write_config(tmp_path / "c.yaml", micro_raw).read_text()
    (tmp_path / "c.yaml").write_text(text.replace("lr: 0.003\n", "lr: 2e-3\n"))
    out = snakemake(tmp_path, "-n", "--configfile=c.yaml", "all").stdout
    assert "micro/full-micro-1k" in out
    (tmp_path / "c.yaml").write_text(text.replace("lr: 0.003\n", "lr: '2e-3'\n"))
    proc = snakemake(tmp_path, "-n", "--configfile=c.yaml", "all", check=False)
    assert proc.returncode != 0
    assert "'2e-3' is a string; write the number unquoted" in proc.stdout + proc.stderr


def test_sizes_read_as_multiples_of_1024(micro_raw, tmp_path):
    defaults = micro_raw["defaults"]
    defaults["context"] = "32k"
    defaults["evaluate"]["perplexity"].update(lengths=["1k", "2K"], max_tokens="1m")
    defaults["evaluate"]["throughput"]["contexts"] = ["32k", "1M"]
    micro_raw["studies"][0]["grid"] = {"variant": ["swa"], "model.swa_window": ["1k"]}
    path = write_config(tmp_path / "c.yaml", micro_raw)
    assert "context: 32k\n" in path.read_text()  # unquoted in the file
    config, runs = load_study(path, check_fit=False)
    assert config["defaults"]["context"] == 32768
    assert config["studies"][0]["grid"]["model.swa_window"] == [1024]
    spec = runs["micro/swa-micro-32k-swa_window1024"]
    assert spec["context"] == 32768 and spec["model"]["swa_window"] == 1024
    assert spec["evaluate"]["perplexity"]["lengths"] == [1024, 2048]
    assert spec["evaluate"]["perplexity"]["max_tokens"] == 1 << 20
    assert spec["evaluate"]["throughput"]["contexts"] == [32768, 1 << 20]
    # the same run as written in integers
    defaults["context"] = 32768
    defaults["evaluate"]["perplexity"].update(lengths=[1024, 2048], max_tokens=1 << 20)
    defaults["evaluate"]["throughput"]["contexts"] = [32768, 1 << 20]
    micro_raw["studies"][0]["grid"]["model.swa_window"] = [1024]
    _, same = load_study(write_config(tmp_path / "d.yaml", micro_raw), check_fit=False)
    assert same["micro/swa-micro-32k-swa_window1024"]["config_hash"] == spec["config_hash"]


@pytest.mark.parametrize("tokens", [1024, 32768, 1536 << 10, 1 << 20, 3 << 20])
def test_sizes_read_back_as_run_ids_print_them(tokens):
    assert parse_tokens(context_label(tokens)) == tokens
    assert parse_tokens(context_label(tokens).swapcase()) == tokens  # 32K, 1m


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda c: c["defaults"].update(context="32q"), "`defaults.context`: '32q'"),
        (
            lambda c: c["defaults"]["evaluate"]["passkey"].update(lengths=["1k", "1.5k"]),
            "`defaults.evaluate.passkey.lengths[1]`: '1.5k'",
        ),
        (
            lambda c: c["studies"][0]["grid"].update(context=["1k", "2kb"]),
            "studies[0] (micro): config field `context`: '2kb'",
        ),
    ],
)
def test_a_bad_size_is_refused_naming_the_field_and_the_forms(micro_raw, tmp_path, mutate, field):
    mutate(micro_raw)
    with pytest.raises(ConfigError, match=re.escape(field)) as err:
        load_config(write_config(tmp_path / "c.yaml", micro_raw))
    assert "is not a token count; write an integer, or a size such as 32k" in str(err.value)


def test_cli_validate_prints_every_error(micro_raw, tmp_path, capsys):
    from ltstudy.cli import main

    micro_raw["defaults"]["train"]["lerning_rate"] = 0.001
    micro_raw["defaults"]["context"] = "32q"
    micro_raw["data"]["validation_fraction"] = 2
    path = write_config(tmp_path / "c.yaml", micro_raw)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: 3 errors\n")
    assert "config field `data.validation_fraction`: 2 is greater than or equal to" in err
    assert "config field `defaults.context`: '32q' is not a token count" in err
    assert "unknown key `lerning_rate` in `defaults.train`; did you mean `lr`?" in err
