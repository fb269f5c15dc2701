"""`ltstudy collect` while a study is in flight: a partial view under results/partial and
reports/partial that never stops `snakemake all` from writing the complete tables; a corrupt
per-run file is named, with how to rebuild it."""

import shutil
import subprocess

import polars as pl
import pytest

from ltstudy.results.collect import RunFileError, collect_table, partial_banner
from tests.conftest import BIN, snakemake, write_config

RUNS = ["micro/full-micro-64", "micro/mamba2-micro-64"]


def ltstudy(workdir, *args):
    return subprocess.run(
        [str(BIN / "ltstudy"), *args], cwd=workdir, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """A two-run training study: one run done, `ltstudy collect`, then `snakemake all`."""
    import yaml

    from tests.conftest import MICRO_CONFIG

    raw = yaml.safe_load(MICRO_CONFIG.read_text())
    raw["studies"] = [
        {"name": "micro", "stages": ["train"], "grid": {"variant": ["full", "mamba2"]}}
    ]
    workdir = tmp_path_factory.mktemp("collect")
    write_config(workdir / "mini.yaml", raw)
    snakemake(workdir, "--configfile=mini.yaml", f"results/runs/{RUNS[0]}/train_curve.parquet")
    collect = ltstudy(workdir, "collect", "mini.yaml")
    # Snakemake owns the tables and the report: one written here, newer than the per-run files
    # it read, would never be rebuilt by `snakemake all`
    owned = [*(workdir / "results").glob("*.parquet"), *(workdir / "reports").glob("*.html")]
    snakemake(workdir, "--configfile=mini.yaml", "all")
    return workdir, collect, owned


def test_collect_writes_a_partial_view_snakemake_does_not_own(collected):
    workdir, collect, owned = collected
    assert collect.returncode == 0, collect.stderr
    assert owned == []
    assert "results/partial/train_curves.parquet: 12 rows" in collect.stdout
    assert "reports/partial/index.html (partial report)" in collect.stdout
    curves = pl.read_parquet(workdir / "results" / "partial" / "train_curves.parquet")
    assert curves["run_id"].unique().to_list() == [RUNS[0]]
    runs = pl.read_parquet(workdir / "results" / "partial" / "runs.parquet")
    assert dict(runs.select("run_id", "status").iter_rows()) == {
        RUNS[0]: "done",
        RUNS[1]: "pending",
    }
    page = (workdir / "reports" / "partial" / "index.html").read_text()
    assert "ltstudy report (partial)" in page
    assert f"1 of 2 runs complete; 1 missing: pending 1 ({RUNS[1]})" in page
    assert (workdir / "reports" / "partial" / "assets" / "vega-bundle.js").exists()


def test_snakemake_all_after_collect_writes_complete_tables(collected):
    workdir, _, _ = collected
    curves = pl.read_parquet(workdir / "results" / "train_curves.parquet")
    assert curves.group_by("run_id").len().sort("run_id").rows() == [(RUNS[0], 12), (RUNS[1], 12)]
    runs = pl.read_parquet(workdir / "results" / "runs.parquet")
    assert runs["status"].to_list() == ["done", "done"] and runs["final_loss"].is_not_null().all()
    page = (workdir / "reports" / "index.html").read_text()
    assert "(partial)" not in page and 'class="partial"' not in page


def test_corrupt_run_file_is_named_with_how_to_rebuild_it(collected, tmp_path):
    workdir = tmp_path / "study"
    shutil.copytree(collected[0], workdir, symlinks=True)
    bad = f"results/runs/{RUNS[0]}/train_curve.parquet"
    data = (workdir / bad).read_bytes()
    (workdir / bad).write_bytes(data[: len(data) // 2])  # a real truncation

    with pytest.raises(RunFileError) as err:
        collect_table("train_curves", [workdir / bad], tmp_path / "out.parquet")
    message = str(err.value)
    assert "\n" not in message and str(workdir / bad) in message
    assert f"--forcerun {workdir / bad}" in message and "delete it" in message

    collect = ltstudy(workdir, "collect", "mini.yaml")  # skips it, counts the run as missing
    assert collect.returncode == 0, collect.stderr
    assert f"warning: skipped {bad}: not a readable Parquet file" in collect.stderr
    assert "results/partial/train_curves.parquet: 12 rows" in collect.stdout
    assert f"1 of 2 runs complete; 1 missing: missing 1 ({RUNS[0]})" in collect.stdout

    # Snakemake's collect rule fails naming the file; the rebuild it names repairs the study
    proc = snakemake(workdir, "--configfile=mini.yaml", "all", check=False)
    assert proc.returncode != 0 and f"{bad}: not a readable Parquet file" in proc.stderr
    snakemake(workdir, "--configfile=mini.yaml", "--forcerun", bad, "all")
    curves = pl.read_parquet(workdir / "results" / "train_curves.parquet")
    assert curves.height == 24


def test_partial_banner_counts_every_missing_run_and_names_the_first_ten():
    failed = [f"study/run{i}" for i in range(12)]
    banner = partial_banner({"failed": failed, "pending": ["study/late"], "missing": []}, 20)
    assert banner.startswith("Partial results from `ltstudy collect`: 7 of 20 runs complete;")
    assert f"failed 12 ({', '.join(failed[:10])} and 2 more); pending 1 (study/late)." in banner
    assert "study/run10" not in banner and "missing 0" not in banner
