"""Evaluation on a trained micro model: every table's schema, perplexity protocols, retrieval
samples and scores reproducible with the same seed, QA skipped with its reason, and the
throughput benchmark command."""

import polars as pl

from ltstudy.cli import main
from ltstudy.config import expand_runs, load_config
from ltstudy.evaluate.passkey import evaluate_passkey
from ltstudy.evaluate.ruler import TASKS
from ltstudy.evaluate.ruler_eval import evaluate_ruler
from ltstudy.results.schemas import TABLES
from tests.conftest import MICRO_CONFIG


def trained_spec(study, run="micro/full-micro-64"):
    workdir, _ = study
    spec = expand_runs(load_config(MICRO_CONFIG))[run]
    for key in ("run_dir", "data_dir"):
        spec[key] = str(workdir / spec[key])
    return spec


def test_retrieval_is_reproducible_with_the_same_seed(study, tmp_path):
    spec = trained_spec(study)
    for name, evaluate in (("ruler", evaluate_ruler), ("passkey", evaluate_passkey)):
        evaluate(spec, str(tmp_path / f"{name}-again.parquet"))
        first = pl.read_parquet(f"{spec['run_dir']}/{name}.parquet")  # written by the workflow
        again = pl.read_parquet(tmp_path / f"{name}-again.parquet")
        assert first.schema == TABLES[name] and first.equals(again), name


def test_ruler_rows_cover_every_task_and_record_skips(study):
    ruler = pl.read_parquet(f"{trained_spec(study)['run_dir']}/ruler.parquet")
    assert set(ruler["task"]) == set(TASKS)
    skipped = ruler.filter(pl.col("status") == "skipped")
    assert set(skipped["task"]) == {"qa_1", "qa_2"}
    assert skipped["reason"].str.contains("squad_path|hotpotqa_path").all()
    ok = ruler.filter(pl.col("status") == "ok")
    assert ok["score"].is_between(0, 100).all() and ok["prediction"].is_not_null().all()


def test_perplexity_protocols(study):
    run_dir = trained_spec(study)["run_dir"]
    ppl = pl.read_parquet(f"{run_dir}/perplexity.parquet")
    assert set(ppl["protocol"]) == {"stride", "final_block"}
    block = ppl.filter(pl.col("protocol") == "final_block")
    assert (block["block"] == 32).all() and (block["tokens_scored"] == 32 * block["windows"]).all()
    positions = pl.read_parquet(f"{run_dir}/position_loss.parquet")
    assert positions.schema == TABLES["position_loss"]
    longest = positions.filter((pl.col("length") == 128) & (pl.col("rope") == "none"))
    assert longest["bucket_start"].to_list() == [0, 32, 64, 96] and (longest["nll"] > 0).all()


def test_throughput_command_prints_and_writes_its_table(tmp_path, capsys):
    assert (
        main(
            [
                "throughput",
                "--variants",
                "full",
                "mamba2",
                "ttt_swa",
                "--sizes",
                "micro",
                "--contexts",
                "64",
                "--warmup",
                "0",
                "--repeats",
                "1",
                "--decode-tokens",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "tokens/s" in out and "MFU %" in out and "decode" in out
    assert "peak from" in out and "measured" in out  # the CPU's peak is a measured matmul
    (path,) = tmp_path.glob("throughput-cpu-*.parquet")  # a new, dated table
    table = pl.read_parquet(path)
    # the throughput stage's columns, and the kernels setting measured
    assert dict(table.drop("kernels").schema) == dict(TABLES["throughput"])
    assert table.height == 3 * 3 and (table["kernels"] == "auto").all()
    assert (table["status"] == "ok").all() and (table["mfu"] > 0).all()
    assert (table["peak_source"] == "measured").all() and (table["peak_tflops"] > 0).all()
    assert path.with_suffix(".md").read_text().startswith("# throughput on cpu")
