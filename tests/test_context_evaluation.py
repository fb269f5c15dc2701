"""Evaluation stages on two ranks (submitit's local executor, gloo) split each scored window
and each prompt over them (context parallelism) and give the single process's tables: the
micro study's trained runs, evaluated again with `resources.evaluate.tasks_per_node: 2`."""

import copy
import shutil

import polars as pl
import pytest

from tests.conftest import launch_stage
from tests.test_evaluation import trained_spec

# multi-process runs (submitit ranks, killed and resumed jobs): `make test-slow`, in CI
pytestmark = pytest.mark.slow

RUNS = ["micro/full-micro-64", "micro/mamba2-micro-64", "micro/ttt_swa-micro-64"]
KEYS = {
    "perplexity": ["protocol", "length", "rope"],
    "position_loss": ["length", "rope", "bucket_start"],
    "passkey": ["length", "rope", "depth", "trial"],
    "ruler": ["task", "length", "rope", "sample"],
}


@pytest.mark.parametrize("run", RUNS)
def test_evaluations_split_over_two_ranks_give_the_single_process_tables(study, tmp_path, run):
    spec = copy.deepcopy(trained_spec(study, run))
    single = spec["run_dir"]
    spec["run_dir"] = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    shutil.copy(f"{single}/model.safetensors", tmp_path / "run")
    out = {name: str(tmp_path / f"{name}.parquet") for name in KEYS}
    stages = {
        "perplexity": {"table": out["perplexity"], "positions": out["position_loss"]},
        "passkey": {"table": out["passkey"]},
        "ruler": {"table": out["ruler"]},
    }
    for stage, outputs in stages.items():
        launch_stage(stage, spec, outputs, tasks_per_node=2)
    for name, keys in KEYS.items():
        one = pl.read_parquet(f"{single}/{name}.parquet").sort(keys)
        two = pl.read_parquet(out[name]).sort(keys)
        assert one.shape == two.shape, name
        for column in one.columns:
            if column in ("nll", "ppl", "score"):
                assert two[column].is_null().equals(one[column].is_null()), f"{name}.{column}"
                values = [
                    (a, b) for a, b in zip(one[column], two[column], strict=True) if a is not None
                ]
                assert [b for _, b in values] == pytest.approx([a for a, _ in values], rel=1e-5)
            else:
                assert two[column].equals(one[column]), f"{name}.{column}"
    for stage in stages:  # rank 0's log says how it split the sequences
        (log,) = (tmp_path / "run" / "logs" / stage).glob("*_0_log.out")
        assert "split over 2 ranks" in log.read_text(), stage
