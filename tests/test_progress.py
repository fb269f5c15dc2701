"""Live progress: the file a job keeps, the lines the waiting launcher prints, `ltstudy status`."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from ltstudy import launch as launch_module
from ltstudy.cli import main
from ltstudy.config import load_config, load_study
from ltstudy.data.dataset import build_dataset
from ltstudy.evaluate.perplexity import evaluate_perplexity
from ltstudy.io import write_json
from ltstudy.jobs import run_stage
from ltstudy.launch import status_path
from ltstudy.progress import format_count, progress_line, read_progress, recording, update
from tests.conftest import MICRO_CONFIG, launch_stage, micro_spec, write_config

STEPS = 300  # a few seconds of micro training: long enough to be seen mid-run


def test_progress_line_and_throttled_writes(tmp_path):
    with recording(tmp_path, "train"):
        update(0, 120, "steps")
        first = read_progress(tmp_path, "train")
        update(1, 120, "steps", loss=3.0)  # within WRITE_EVERY_S of the first: not yet written
        assert read_progress(tmp_path, "train") == first
        update(2, 120, "steps", loss=2.5)
    last = read_progress(tmp_path, "train")  # the block's end writes what was held back
    assert first["done"] == 0 and first["eta_s"] is None
    assert last["done"] == 2 and last["loss"] == 2.5 and last["rate"] > 0 and last["eta_s"] > 0
    line = progress_line("demo/run", {**last, "eta_s": 72.0}, now=last["updated"])
    assert line == "[ltstudy] demo/run train: step 2/120 (2%) loss 2.5000, eta 1m12s"
    unknown = {"done": 1, "total": None, "unit": "documents"}
    assert format_count(unknown) == "1 document"
    assert format_count({**unknown, "done": 1200}) == "1,200 documents"
    update(3, 120, "steps")  # outside a recording (another rank, a test): no file, no error
    assert read_progress(tmp_path, "train")["done"] == 2
    assert read_progress(tmp_path, "perplexity") is None


def test_training_job_writes_progress_and_launch_prints_it(
    tmp_path, micro_data, capsys, monkeypatch
):
    monkeypatch.setattr(launch_module, "POLL_EVERY_S", 0.05)
    monkeypatch.setattr(launch_module, "PRINT_EVERY_S", 0.0)
    spec = micro_spec(tmp_path, micro_data, steps=STEPS, log_every=STEPS)
    launch_stage("train", spec, {"model": f"{spec['run_dir']}/model.safetensors"})

    progress = read_progress(spec["run_dir"], "train")
    assert progress["done"] == progress["total"] == STEPS and progress["unit"] == "steps"
    assert progress["loss"] > 0 and progress["rate"] > 0 and progress["eta_s"] == 0
    out = capsys.readouterr().out
    steps = [int(s) for s in re.findall(rf"\] {spec['run_id']} train: step (\d+)/{STEPS}", out)]
    assert steps and any(0 < s < STEPS for s in steps), out  # seen while the job ran
    assert steps == sorted(set(steps))  # one line per change

    # evaluations report theirs (here in this process, as the job's rank 0 would)

    run = Path(spec["run_dir"])
    with recording(run, "perplexity"):
        evaluate_perplexity(
            spec, {"table": str(run / "ppl.parquet"), "positions": str(run / "pos.parquet")}
        )
    progress = read_progress(run, "perplexity")
    # lengths 64 (the run's own rope) and 128 (its own and yarn beyond the context)
    assert progress["done"] == progress["total"] == 3 and progress["unit"] == "points"
    for stage, prompts in (("passkey", 2), ("ruler", 13)):  # 2 depths; 13 tasks x 1 sample
        with recording(run, stage):
            run_stage(stage, spec, {"table": str(run / f"{stage}.parquet")})
        progress = read_progress(run, stage)
        assert progress["done"] == progress["total"] == prompts and progress["unit"] == "prompts"


def test_data_stage_counts_documents(tmp_path):
    with recording(tmp_path, "data"):
        manifest = build_dataset(load_config(MICRO_CONFIG)["data"], tmp_path)
    progress = read_progress(tmp_path, "data")
    assert progress["unit"] == "documents" and progress["total"] is None
    assert 0 < progress["done"] <= manifest["documents"]
    assert progress_line("data-x", progress).endswith(f"data: {progress['done']:,} documents")


def test_launch_never_shows_a_previous_jobs_progress(tmp_path, micro_data, capsys, monkeypatch):
    monkeypatch.setattr(launch_module, "POLL_EVERY_S", 0.05)
    monkeypatch.setattr(launch_module, "PRINT_EVERY_S", 0.0)
    spec = micro_spec(tmp_path, micro_data, steps=2)
    with recording(spec["run_dir"], "train"):  # an earlier job's, stopped at step 999
        update(999, 1000, "steps")
    launch_stage("train", spec, {"model": f"{spec['run_dir']}/model.safetensors"})
    assert "999" not in capsys.readouterr().out
    assert read_progress(spec["run_dir"], "train")["done"] == 2


@pytest.fixture
def two_runs(tmp_path, micro_raw) -> tuple[Path, dict]:
    """A micro config with its results in tmp_path: one run training (with a progress file),
    one failed; the others pending."""
    micro_raw["results_dir"] = str(tmp_path / "results")
    config = write_config(tmp_path / "micro.yaml", micro_raw)
    runs = load_study(config)[1]
    training, failed = list(runs.values())[:2]
    write_json(status_path(training["run_dir"], "train"), {"status": "running"})
    with recording(training["run_dir"], "train"):
        update(0, 120, "steps")
        time.sleep(0.05)
        update(40, 120, "steps", loss=2.3104)
    log = f"{failed['run_dir']}/logs/train/123_0_log.out"
    reason = "out of memory: torch.OutOfMemoryError: CUDA out of memory"
    status = {"status": "failed", "reason": reason, "log": log}
    write_json(status_path(failed["run_dir"], "train"), status)
    return config, runs


def test_status_shows_progress_eta_and_failures(two_runs, capsys):
    config, runs = two_runs
    training, failed = list(runs)[:2]
    assert main(["status", str(config)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["run", "status", "stage", "progress", "eta", "loss"]
    row = next(line for line in lines if line.startswith(training))
    assert re.search(r"running\s+train\s+step 40/120 \(33%\)\s+\d+s\s+2\.3104$", row), row
    at = lines.index(next(line for line in lines if line.startswith(failed)))
    assert lines[at].split()[1:3] == ["failed", "train"]
    assert "CUDA out of memory" in lines[at + 1] and lines[at + 2].endswith("123_0_log.out")
    assert lines[-1] == f"1 failed, {len(runs) - 2} pending, 1 running"
    # columns line up: every row's status starts where the header's does
    column = lines[0].index("status")
    assert all(line[column:].split()[0] in ("running", "failed") for line in (row, lines[at]))


def test_status_watch_redraws_until_nothing_runs(two_runs, capsys):
    config, runs = two_runs
    training = next(iter(runs.values()))

    def finish() -> None:
        time.sleep(0.5)
        write_json(status_path(training["run_dir"], "train"), {"status": "done"})

    thread = threading.Thread(target=finish)
    thread.start()
    started = time.time()
    assert main(["status", str(config), "--watch", "0.1"]) == 0
    thread.join()
    out = capsys.readouterr().out
    assert time.time() - started < 10
    assert out.count("every 0.1s, Ctrl-C stops") >= 2
    assert "1 running" in out  # the first drawing
    assert out.splitlines()[-1] == f"1 failed, {len(runs) - 1} pending"  # train done, evals not
