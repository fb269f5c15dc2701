"""Fault injection on real jobs: each fault hits a micro training run launched as the workflow
launches it (a submitit job in its own processes), and the run must either end with exactly the
loss curve of an uninterrupted run or fail with one line naming the cause.

Collect-while-running and corrupt per-run tables are in test_collect.py; malicious and
truncated checkpoints in-process in test_checkpoint.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from ltstudy.attempts import read_attempts
from ltstudy.launch import LaunchError, read_status
from tests.conftest import ROOT, launch_stage, micro_spec
from tests.test_checkpoint import record_sizes

# multi-process runs (submitit ranks, killed and resumed jobs): `make test-slow`, in CI
pytestmark = pytest.mark.slow

CURVE = ["step", "tokens", "loss", "lr", "grad_norm"]
STEPS, EVERY = 400, 50  # long enough to hit mid-run, short enough for seconds per run


def faulty_spec(tmp_path: Path, data: Path, name: str) -> dict:
    return micro_spec(tmp_path / name, data, steps=STEPS, checkpoint_every=EVERY, log_every=1)


def outputs(spec: dict) -> dict[str, str]:
    return {"model": f"{spec['run_dir']}/model.safetensors"}


def curve(spec: dict) -> pl.DataFrame:
    return pl.read_parquet(Path(spec["run_dir"]) / "train_curve.parquet").select(CURVE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, micro_data) -> pl.DataFrame:
    """The uninterrupted run's loss curve."""
    spec = faulty_spec(tmp_path_factory.mktemp("reference"), micro_data, "run")
    launch_stage("train", spec, outputs(spec))
    return curve(spec)


class Launched:
    """A launch running in a thread, as Snakemake's rule would wait on it."""

    def __init__(self, spec: dict, **kwargs) -> None:
        self.spec, self.error, self.result = spec, None, None
        self.thread = threading.Thread(target=self._run, kwargs=kwargs, daemon=True)
        self.thread.start()

    def _run(self, **kwargs) -> None:
        try:
            self.result = launch_stage("train", self.spec, outputs(self.spec), **kwargs)
        except BaseException as err:
            self.error = err

    def wait_for_step(self, step: int, attempt: int = 1, timeout: float = 120) -> int:
        """Wait until the job's attempt `attempt` logged step >= `step`; return its task pid."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.thread.is_alive(), f"the job ended early: {self.error}"
            status = read_status(self.spec["run_dir"], "train") or {}
            attempts = read_attempts(self.spec["run_dir"], "train")
            if status.get("log") and len(attempts) >= attempt and os.path.exists(status["log"]):
                steps = re.findall(r"step (\d+)/", Path(status["log"]).read_text())
                if steps and int(steps[-1]) >= step:
                    return attempts[attempt - 1]["pid"]
            time.sleep(0.02)
        raise TimeoutError(f"step {step} not reached")

    def join(self, timeout: float = 300) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the launch did not return"


def test_kill_9_mid_step_resumes_onto_the_same_curve(tmp_path, micro_data, reference):
    spec = faulty_spec(tmp_path, micro_data, "killed")
    run = Launched(spec)
    os.kill(run.wait_for_step(EVERY + 10), signal.SIGKILL)
    run.join()
    assert isinstance(run.error, LaunchError)
    status = read_status(spec["run_dir"], "train")
    assert status["status"] == "failed" and "\n" not in status["reason"]
    assert "killed by a signal" in status["reason"]

    launch_stage("train", spec, outputs(spec))  # Snakemake's rerun
    assert curve(spec).equals(reference)
    status = read_status(spec["run_dir"], "train")
    attempts = read_attempts(spec["run_dir"], "train")
    assert status["status"] == "done" and status["attempts"] == 2 == len(attempts)
    assert [a["outcome"] for a in attempts] == ["killed", "done"]
    assert status["wall_s"] == pytest.approx(sum(a["ended"] - a["started"] for a in attempts))
    assert attempts[0]["ended"] - attempts[0]["started"] > 0.5  # the killed attempt counts


def test_usr2_requeues_a_local_job_which_resumes(tmp_path, micro_data, reference):
    """USR2 is Slurm's warning before the time limit; the local executor sends it too."""
    spec = faulty_spec(tmp_path, micro_data, "usr2")
    run = Launched(spec)
    os.kill(run.wait_for_step(10), signal.SIGUSR2)
    run.join()
    assert run.error is None, run.error
    log = Path(read_status(spec["run_dir"], "train")["log"]).read_text()
    saved = re.search(r"checkpoint saved at step (\d+)", log).group(1)
    assert f"resuming from step {saved}" in log
    assert curve(spec).equals(reference)
    assert [a["outcome"] for a in read_attempts(spec["run_dir"], "train")] == ["requeued", "done"]


def test_sigterm_stops_a_local_job_which_resumes_when_rerun(tmp_path, micro_data, reference):
    """SIGTERM on a local job is someone stopping it: checkpoint, fail with one line, and the
    next launch resumes."""
    spec = faulty_spec(tmp_path, micro_data, "term")
    run = Launched(spec)
    os.kill(run.wait_for_step(10), signal.SIGTERM)
    run.join()
    reason = read_status(spec["run_dir"], "train")["reason"]
    assert reason.startswith("ltstudy.train.TrainingInterrupted") and "SIGTERM" in reason
    stopped = int(re.search(r"at step (\d+)/", reason).group(1))
    launch_stage("train", spec, outputs(spec))
    log = Path(read_status(spec["run_dir"], "train")["log"]).read_text()
    assert f"resuming from step {stopped}" in log
    assert curve(spec).equals(reference)


@pytest.mark.parametrize("how", ["sigterm", "preempt"])
def test_preempted_slurm_job_is_requeued_and_the_waiting_side_follows_it(
    tmp_path, micro_data, reference, fake_slurm, how
):
    """Preemption through a fake Slurm: SIGTERM to every task. `sigterm`: the job requeues
    itself (PreemptMode=CANCEL would lose it otherwise); `preempt`: Slurm requeues it
    (PreemptMode=REQUEUE) and then kills what is left after KillWait."""
    spec = faulty_spec(tmp_path, micro_data, how)
    run = Launched(spec, launcher="slurm")
    run.wait_for_step(EVERY + 10)
    job_id = read_status(spec["run_dir"], "train")["job_id"]
    if how == "sigterm":
        fake_slurm.signal(job_id, signal.SIGTERM)
    else:
        fake_slurm.preempt(job_id)
    run.join()
    assert run.error is None, run.error
    assert fake_slurm.starts(job_id) == 2
    assert curve(spec).equals(reference)
    attempts = read_attempts(spec["run_dir"], "train")
    assert [a["outcome"] for a in attempts] == ["requeued", "done"]
    assert read_status(spec["run_dir"], "train")["attempts"] == 2


def test_cancelled_slurm_job_fails_saying_so(tmp_path, micro_data, fake_slurm):
    """`scancel` also sends SIGTERM: the job checkpoints and stops, and is not requeued."""
    spec = faulty_spec(tmp_path, micro_data, "cancelled")
    run = Launched(spec, launcher="slurm")
    run.wait_for_step(10)
    job_id = read_status(spec["run_dir"], "train")["job_id"]
    fake_slurm.cancel(job_id)
    run.join()
    assert isinstance(run.error, LaunchError)
    assert fake_slurm.starts(job_id) == 1
    reason = read_status(spec["run_dir"], "train")["reason"]
    assert "SIGTERM (the Slurm job was cancelled)" in reason and "\n" not in reason


def test_truncated_checkpoint_is_moved_aside_and_the_previous_one_resumes(
    tmp_path, micro_data, reference
):
    spec = faulty_spec(tmp_path, micro_data, "truncated")
    run = Launched(spec)
    os.kill(run.wait_for_step(2 * EVERY + 10), signal.SIGKILL)
    run.join()
    root = Path(spec["run_dir"]) / "checkpoints"
    newest = sorted(root.glob("step-*"))[-1]
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)

    launch_stage("train", spec, outputs(spec))
    log = Path(read_status(spec["run_dir"], "train")["log"]).read_text()
    assert re.search(rf"\[train\].*{re.escape(newest.name)}", log), log[-3000:]
    assert "resuming from step" in log
    assert curve(spec).equals(reference)


def test_malicious_checkpoint_never_runs_its_code(tmp_path, micro_data, reference):
    spec = faulty_spec(tmp_path, micro_data, "malicious")
    run = Launched(spec)
    os.kill(run.wait_for_step(EVERY + 10), signal.SIGKILL)
    run.join()
    newest = sorted((Path(spec["run_dir"]) / "checkpoints").glob("step-*"))[-1]
    marker = tmp_path / "pwned"
    payload = textwrap.dedent(
        f"""
        import os, pickle
        class Evil:
            def __reduce__(self):
                return (os.system, ("touch {marker}",))
        with open({str(newest / ".metadata")!r}, "wb") as f:
            pickle.dump(Evil(), f)
        """
    )
    subprocess.run([sys.executable, "-c", payload], check=True)
    record_sizes(newest)  # as a crafted checkpoint would: only the unpickler can stop it

    launch_stage("train", spec, outputs(spec))
    assert not marker.exists()
    log = Path(read_status(spec["run_dir"], "train")["log"]).read_text()
    assert re.search(rf"\[train\].*{re.escape(newest.name)}.*refused global", log), log[-3000:]
    assert curve(spec).equals(reference)


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt || exit 1"],
        capture_output=True,
    )
    return probe.returncode == 0


FULL_DISK_DRIVER = """
import json, subprocess, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.conftest import launch_stage
from ltstudy.launch import LaunchError, read_status
spec = json.loads(Path({spec!r}).read_text())
out = {{}}
try:
    launch_stage("train", spec, {{"model": spec["run_dir"] + "/model.safetensors"}})
    out["first"] = "done"
except LaunchError:
    out["first"] = read_status(spec["run_dir"], "train")["reason"]
# space is freed: the same command again
subprocess.run(["mount", "-o", "remount,size=64m", {mount!r}], check=True)
launch_stage("train", spec, {{"model": spec["run_dir"] + "/model.safetensors"}})
out["second"] = read_status(spec["run_dir"], "train")["status"]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` to mount a small tmpfs")
def test_full_disk_fails_naming_enospc_and_resumes_once_space_is_freed(
    tmp_path, micro_data, reference
):
    """The checkpoints live on a filesystem with room for about one checkpoint (a tmpfs in a
    private mount namespace): saving the second fails with ENOSPC."""
    import json

    spec = faulty_spec(tmp_path, micro_data, "full")
    mount = Path(spec["run_dir"]) / "checkpoints"
    mount.mkdir(parents=True)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    driver = tmp_path / "driver.py"
    driver.write_text(
        FULL_DISK_DRIVER.format(root=str(ROOT), spec=str(tmp_path / "spec.json"), mount=str(mount))
    )
    script = f"mount -t tmpfs -o size=1100k tmpfs {mount} && exec {sys.executable} {driver}"
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["first"].startswith("disk full (ENOSPC)"), result
    assert "\n" not in result["first"]
    assert result["second"] == "done"
    assert curve(spec).equals(reference)
