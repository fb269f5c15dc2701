"""End to end through the real Snakefile: a micro study trained and evaluated via submitit's
local executor, Parquet tables with their fixed schemas, the report, incremental reruns, and
the slurm profile's dry run of the full study."""

import re
import subprocess

import polars as pl

from ltstudy.config import expand_runs, load_config
from ltstudy.models.variants import VARIANTS
from ltstudy.results.schemas import TABLES
from tests.conftest import BIN, MICRO_CONFIG, ROOT, snakemake, write_config

RUNS = ["micro/full-micro-64", "micro/mamba2-micro-64", "micro/ttt_swa-micro-64"]


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake run or dry run."""
    counts = {}
    block = output.split("Job stats:", 1)[1]
    for line in block.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not match:
            break
        counts[match.group(1)] = int(match.group(2))
    return counts


def test_study_writes_every_table_with_its_schema(study):
    workdir, _ = study
    for table, schema in TABLES.items():
        frame = pl.read_parquet(workdir / "results" / f"{table}.parquet")
        assert frame.schema == schema, table
        assert frame.height > 0, table
        if table != "runs":
            assert sorted(frame["run_id"].unique()) == RUNS, table
    runs = pl.read_parquet(workdir / "results" / "runs.parquet")
    assert runs["status"].to_list() == ["done"] * 3
    assert (runs["final_loss"] < 5.0).all() and (runs["params"] > 0).all()
    spec = expand_runs(load_config(MICRO_CONFIG))[RUNS[0]]
    assert runs.filter(pl.col("run_id") == RUNS[0])["config_hash"][0] == spec["config_hash"]
    ppl = pl.read_parquet(workdir / "results" / "perplexity.parquet")
    assert set(ppl["length"]) == {64, 128} and (ppl["ppl"] > 1).all()
    # beyond the training context: the run's own positions and YaRN, for the attention variants
    full = ppl.filter((pl.col("run_id") == RUNS[0]) & (pl.col("protocol") == "stride"))
    assert full.sort("length", "rope").select("length", "rope").rows() == [
        (64, "none"),
        (128, "none"),
        (128, "yarn x2"),
    ]
    # a model without RoPE gets no position-extension rows
    mamba = ppl.filter((pl.col("run_id") == RUNS[1]) & (pl.col("protocol") == "stride"))
    assert set(mamba["rope"]) == {"none"}
    curves = pl.read_parquet(workdir / "results" / "train_curves.parquet")
    assert curves.group_by("run_id").len()["len"].to_list() == [12] * 3


def test_status_command_reports_done_runs(study):
    workdir, _ = study
    proc = subprocess.run(
        [str(BIN / "ltstudy"), "status", "micro.yaml"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("3 done")


def test_job_logs_live_next_to_run_outputs(study):
    workdir, _ = study
    run_dir = workdir / "results" / "runs" / RUNS[1]
    logs = list((run_dir / "logs" / "train").glob("*_log.out"))
    assert logs and "step 12/12" in logs[0].read_text()
    assert (run_dir / "status" / "train.json").exists()


def test_throughput_jobs_run_alone(study):
    """No other job of the study (two cores) ran while a throughput job timed: their attempts'
    intervals, as each job recorded them, do not overlap."""
    from ltstudy.attempts import read_attempts

    workdir, _ = study
    intervals = []
    for run in RUNS:
        status_dir = workdir / "results" / "runs" / run / "status"
        for path in status_dir.glob("*.attempts.json"):
            stage = path.name.removesuffix(".attempts.json")
            for attempt in read_attempts(status_dir.parent, stage):
                intervals.append((stage, run, attempt["started"], attempt["ended"]))
    timed = [i for i in intervals if i[0] == "throughput"]
    assert len(timed) == len(RUNS) and len(intervals) > 2 * len(RUNS)
    for stage, run, start, end in timed:
        others = [i for i in intervals if i[:2] != (stage, run) and i[2] < end and start < i[3]]
        assert not others, f"{run} throughput shared the machine with {others}"


def test_report_page_has_every_section(study):
    workdir, _ = study
    page = (workdir / "reports" / "index.html").read_text()
    # 8: the leaderboard and every section but passkey by distance (no micro prompt fits the
    # 64-token context) and lm_eval (skipped offline)
    assert page.count('class="chart"') == 8 and "<table>" in page
    assert "qa_1: skipped" in page  # skipped RULER tasks are named with their reason
    assert 'src="assets/vega-bundle.js"' in page and "cdn" not in page.lower()
    assert (workdir / "reports" / "assets" / "vega-bundle.js").stat().st_size > 500_000


def test_second_run_does_nothing(study):
    workdir, _ = study
    proc = snakemake(workdir, "--configfile=micro.yaml", "-n", "all")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_deleting_outputs_rebuilds_only_what_depends_on_them(study):
    workdir, _ = study
    run_dir = workdir / "results" / "runs" / RUNS[0]
    (run_dir / "perplexity.parquet").unlink()
    proc = snakemake(workdir, "--configfile=micro.yaml", "-n", "all")
    assert job_counts(proc.stdout + proc.stderr) == {
        "perplexity": 1,
        "collect_table": 2,  # perplexity and position_loss
        "collect_runs": 1,
        "report": 1,
        "all": 1,
        "total": 6,
    }
    model_bytes = (run_dir / "model.safetensors").read_bytes()
    (run_dir / "model.safetensors").unlink()
    proc = snakemake(workdir, "--configfile=micro.yaml", "-n", "all")
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["train"] == 1 and counts["passkey"] == 1 and counts["perplexity"] == 1
    assert counts["ruler"] == 1
    assert "throughput" not in counts and "prepare_data" not in counts
    assert RUNS[1] not in proc.stdout.split("Job stats:")[0].replace("micro.yaml", "")
    # rebuild just that run by its target, as the README documents
    snakemake(workdir, "--configfile=micro.yaml", f"results/runs/{RUNS[0]}/perplexity.parquet")
    assert (run_dir / "perplexity.parquet").exists()
    # a run is a pure function of its spec: retrained, the model is the same file, byte for
    # byte, so Snakemake (which compares the contents of small inputs) keeps the run's passkey
    # and RULER results; `all` only refreshes the tables and the report
    assert (run_dir / "model.safetensors").read_bytes() == model_bytes
    proc = snakemake(workdir, "--configfile=micro.yaml", "all")
    counts = job_counts(proc.stdout + proc.stderr)
    assert "passkey" not in counts and "ruler" not in counts and counts["report"] == 1
    assert "Nothing to be done" in snakemake(workdir, "--configfile=micro.yaml", "-n", "all").stdout


def test_forcerun_one_run_reruns_only_that_run(study):
    workdir, _ = study
    target = f"results/runs/{RUNS[1]}/model.safetensors"
    proc = snakemake(workdir, "--configfile=micro.yaml", "-n", "all", "--forcerun", target)
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["train"] == 1 and counts["perplexity"] == 1 and counts["passkey"] == 1
    assert "throughput" not in counts


def test_named_study_target(study):
    workdir, _ = study
    proc = snakemake(workdir, "--configfile=micro.yaml", "-n", "study_micro")
    assert proc.returncode == 0


def test_unknown_variant_fails_before_any_job(tmp_path, micro_raw):
    micro_raw["studies"][0]["grid"]["variant"] = ["full", "mamba9"]
    write_config(tmp_path / "bad.yaml", micro_raw)
    proc = snakemake(tmp_path, "--configfile=bad.yaml", "all", check=False)
    assert proc.returncode != 0
    assert "config field `variant`: unknown variant 'mamba9'" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_slurm_profile_dry_run_lists_every_run_of_the_full_study():
    """`snakemake --profile slurm -n all` from the repo root, with no Slurm installed."""
    proc = subprocess.run(
        # --quiet host instead of the profile's `quiet: [rules]`: a line per job, read below
        [str(BIN / "snakemake"), "--profile", "slurm", "-n", "--quiet", "host", "--", "all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = expand_runs(load_config(ROOT / "config" / "config.yaml"))
    counts = job_counts(proc.stdout + proc.stderr)
    for stage in ("train", "perplexity", "passkey", "throughput"):
        assert counts[stage] == sum(stage in s["stages"] for s in runs.values()), stage
    listed = set(re.findall(r"wildcards: study=(\w+), run=(\S+)", proc.stdout))
    assert listed == {(s["study"], s["name"]) for s in runs.values()}
    combos = {(s["variant"], s["size"], s["context"]) for s in runs.values()}
    assert {v for v, _, _ in combos} == set(VARIANTS)
    assert {z for _, z, _ in combos} == {"500M", "1.5B", "4B", "8B", "14B"}
    assert "slurm_jobs=1" in proc.stdout  # every launched job counts against the Slurm cap
