"""The submitit launcher: resource mapping, real local jobs, failures that name run and log."""

import polars as pl
import pytest

from ltstudy.launch import LaunchError, read_status, submitit_parameters
from ltstudy.results.collect import collect_available
from ltstudy.results.schemas import TABLES
from tests.conftest import launch_stage, micro_spec

RESOURCES = {
    "gpu": 4,
    "nodes": 2,
    "tasks_per_node": 4,
    "cpus_per_task": 16,
    "mem_mb": 250000,
    "runtime": 90,
    "slurm_partition": "h100",
    "slurm_account": "lab",
    "constraint": "",
    "signal_delay_s": 300,
}


def test_slurm_parameters():
    params = submitit_parameters(RESOURCES, "slurm", "ltstudy-train-x")
    assert params == {
        "timeout_min": 90,
        "gpus_per_node": 4,
        "tasks_per_node": 4,
        "name": "ltstudy-train-x",
        "nodes": 2,
        "cpus_per_task": 16,
        "mem_gb": 245,
        "slurm_signal_delay_s": 300,
        "slurm_partition": "h100",
        "slurm_account": "lab",
    }
    assert isinstance(params["timeout_min"], int)


def test_local_parameters_always_set_timeout_and_gpus():
    params = submitit_parameters({"gpu": 0, "runtime": 5}, "local", "x")
    assert params["timeout_min"] == 5 and params["gpus_per_node"] == 0
    with pytest.raises(LaunchError, match="one node"):
        submitit_parameters({"nodes": 2}, "local", "x")


@pytest.mark.parametrize("launcher", ["local", "debug"])
def test_job_runs_a_stage_and_records_status(tmp_path, micro_data, launcher):
    spec = micro_spec(tmp_path, micro_data)
    out = tmp_path / "run" / "throughput.parquet"
    launch_stage("throughput", spec, {"table": str(out)}, launcher)

    table = pl.read_parquet(out)
    assert table.schema == TABLES["throughput"] and table.height == 2 * 3  # contexts x modes
    status = read_status(spec["run_dir"], "throughput")
    assert status["status"] == "done" and status["job_id"] and status["wall_s"] > 0
    if launcher == "local":
        with open(status["log"]) as log:  # the job's progress output is in its log
            assert "train 64:" in log.read()


def test_failed_job_names_the_run_and_its_log(tmp_path, micro_data):
    spec = micro_spec(tmp_path, micro_data)  # never trained: no model.safetensors to evaluate
    with pytest.raises(LaunchError) as err:
        launch_stage("perplexity", spec, {"table": str(tmp_path / "run" / "perplexity.parquet")})
    message = str(err.value)
    assert spec["run_id"] in message and "model.safetensors" in message
    status = read_status(spec["run_dir"], "perplexity")
    assert status["status"] == "failed" and "model.safetensors" in status["reason"]
    assert status["log"] in message and (tmp_path / "run" / "logs" / "perplexity").is_dir()
    assert not (tmp_path / "run" / "perplexity.parquet").exists()
    # the runs table records the failure and its reason
    tables = collect_available({spec["run_id"]: spec}, tmp_path / "results")
    row = tables["runs"].row(0, named=True)
    assert (
        row["status"] == "failed"
        and "perplexity" in row["error"]
        and "model.safetensors" in row["error"]
    )


WAITER = """
import json, sys
from ltstudy.launch import launch
spec = json.load(open(sys.argv[1]))
launch("train", spec, label=spec["run_id"], work_dir=spec["run_dir"], outputs={},
       resources={"gpu": 0, "runtime": 10}, launcher="local")
"""


def test_stopping_the_waiting_rule_cancels_its_local_job(tmp_path, micro_data):
    """Snakemake stops a job's process with SIGTERM; the local job must not be left running."""
    import json
    import signal
    import subprocess
    import sys
    import time

    import psutil

    spec = micro_spec(tmp_path, micro_data, steps=100000, log_every=100)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    waiter = subprocess.Popen([sys.executable, "-c", WAITER, str(tmp_path / "spec.json")])
    deadline = time.time() + 120
    while (read_status(spec["run_dir"], "train") or {}).get("job_id") is None:
        assert time.time() < deadline and waiter.poll() is None
        time.sleep(0.1)
    controller = psutil.Process(int(read_status(spec["run_dir"], "train")["job_id"]))
    while not controller.children():  # the training task process
        assert time.time() < deadline
        time.sleep(0.1)
    processes = [controller, *controller.children()]
    waiter.send_signal(signal.SIGTERM)
    assert waiter.wait(timeout=60) != 0
    status = read_status(spec["run_dir"], "train")
    assert status["status"] == "failed" and "interrupted" in status["reason"]
    _, alive = psutil.wait_procs(processes, timeout=60)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "the local job still runs"


@pytest.mark.parametrize(
    "error, log, expected",
    [
        (
            "FailedJobError",
            'Traceback (most recent call last):\n  File "x.py", line 1\n'
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
            "out of memory: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate",
        ),
        (
            "UncompletedJobError",
            "has not produced any output (state: FINISHED)\n" + "[train] step 5\n" * 40,
            "the job ended without a result or a Python error: its process was killed",
        ),
        ("UncompletedJobError", "(state: TIMEOUT)\n", "time limit reached (Slurm state TIMEOUT)"),
        (
            "FailedJobError",
            "Traceback (most recent call last):\n  File ...\nValueError: config field `lr`: bad",
            "ValueError: config field `lr`: bad",
        ),
    ],
)
def test_failure_reason_is_one_line_with_the_root_cause(tmp_path, error, log, expected):
    """Real submitit errors as its waiting side raises them, with the job's error log."""
    import submitit

    from ltstudy.failures import failure_reason

    stderr = tmp_path / "job.err"
    stderr.write_text(log)
    reason = failure_reason(getattr(submitit.core.utils, error)(log), stderr)
    assert reason.startswith(expected) and "\n" not in reason
