"""Real submitit Slurm jobs through the fake Slurm of tests/fake_slurm (sbatch, srun, sacct,
scontrol, scancel on PATH): results, failures, several tasks, requeue on the warning signal, at
the time limit and on preemption, cancel, and an ltstudy training stage."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import submitit

from tests.conftest import launch_stage, micro_spec


def add(a: int, b: int) -> int:
    return a + b


def fail() -> None:
    raise ValueError("bad input for the fake job")


def rank() -> dict:
    env = submitit.JobEnvironment()
    return {
        "rank": env.global_rank,
        "local": env.local_rank,
        "tasks": env.num_tasks,
        "job": env.job_id,
    }


class Sleeper(submitit.helpers.Checkpointable):
    """Marks each start of its job in `folder` (its signal handlers are in place by then); the
    first attempt sleeps until a signal ends it, later ones return at once."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, seconds: float) -> dict:
        attempt = len(list(self.folder.glob("started-*"))) + 1
        (self.folder / f"started-{attempt}").touch()
        if attempt == 1:
            time.sleep(seconds)
        return {"attempt": attempt, "restarts": os.environ["SLURM_RESTART_COUNT"]}


def executor(folder: Path, **params) -> submitit.Executor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(**{"timeout_min": 5, **params})
    return executor


def done(job: submitit.Job, timeout: float = 120) -> submitit.Job:
    """The job once submitit says it is done: a test fails, not hangs, if a job is lost."""
    deadline = time.time() + timeout
    while not job.done():
        assert time.time() < deadline, f"job {job.job_id} not done in {timeout} s: {job.stdout()}"
        time.sleep(0.1)
    return job


def wait_for(path: Path, job: submitit.Job, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline and not job.done(), job.stdout()
        time.sleep(0.05)


def test_a_function_returns_its_result(tmp_path, fake_slurm):
    job = executor(tmp_path / "logs").submit(add, 2, 3)
    assert isinstance(job, submitit.SlurmJob)
    assert done(job).result() == 5
    assert fake_slurm.wait_state(job.job_id, "COMPLETED")["starts"] == 1
    assert job.get_info()["State"] == "COMPLETED"  # submitit calls sacct
    assert fake_slurm.jobs() == {job.job_id: "COMPLETED"}
    assert "#SBATCH --signal=USR2@90" in job.paths.submission_file.read_text()
    assert "Job completed successfully" in job.stdout()  # srun --output with %j and %t expanded


def test_a_failing_function_raises_its_traceback(tmp_path, fake_slurm):
    job = executor(tmp_path / "logs").submit(fail)
    with pytest.raises(
        submitit.core.utils.FailedJobError, match="bad input for the fake job"
    ) as err:
        done(job).result()
    assert "Traceback" in str(err.value)
    assert fake_slurm.wait_state(job.job_id, "FAILED")["exit_code"] == "1:0"


def test_two_tasks_per_node_run_two_ranks(tmp_path, fake_slurm):
    job = executor(tmp_path / "logs", tasks_per_node=2).submit(rank)
    results = done(job).results()
    assert results == [
        {"rank": 0, "local": 0, "tasks": 2, "job": job.job_id},
        {"rank": 1, "local": 1, "tasks": 2, "job": job.job_id},
    ]
    assert job.task(1).paths.stdout.exists() and job.task(1).paths.stdout != job.paths.stdout


def test_usr2_requeues_a_checkpointable_job_and_its_result_is_the_second_attempts(
    tmp_path, fake_slurm
):
    """Slurm's warning signal: submitit's handler runs `scontrol requeue`, the job runs again,
    and the waiting side returns the second attempt's result."""
    job = executor(tmp_path / "logs").submit(Sleeper(tmp_path), 300)
    wait_for(tmp_path / "started-1", job)
    assert fake_slurm.signal(job.job_id, signal.SIGUSR2) == 1
    assert done(job).result() == {"attempt": 2, "restarts": "1"}
    assert fake_slurm.wait_state(job.job_id, "COMPLETED")["starts"] == 2
    assert "Requeued job" in job.stdout()


def test_the_time_limit_sends_the_warning_signal_and_the_job_requeues(tmp_path, fake_slurm):
    """--time=1 --signal=USR2@52: USR2 8 s after the start, as Slurm does before a time limit."""
    params = {"timeout_min": 1, "slurm_signal_delay_s": 52}
    job = executor(tmp_path / "logs", **params).submit(Sleeper(tmp_path), 300)
    assert done(job).result() == {"attempt": 2, "restarts": "1"}
    assert fake_slurm.starts(job.job_id) == 2
    assert "Caught signal SIGUSR2" in job.stdout()


def test_preemption_terminates_then_kills_and_slurm_requeues_the_job(
    tmp_path, fake_slurm, monkeypatch
):
    """PreemptMode=REQUEUE: SIGTERM (which submitit ignores), SIGKILL after KillWait, and the
    job runs again; the waiting side follows it."""
    monkeypatch.setenv("FAKE_SLURM_KILL_WAIT", "1")
    job = executor(tmp_path / "logs").submit(Sleeper(tmp_path), 300)
    wait_for(tmp_path / "started-1", job)
    fake_slurm.wait_running(job.job_id)
    fake_slurm.preempt(job.job_id)
    assert fake_slurm.state(job.job_id) == "PREEMPTED"
    assert done(job).result() == {"attempt": 2, "restarts": "1"}
    assert fake_slurm.starts(job.job_id) == 2
    assert "Bypassing signal SIGTERM" in job.stdout()


def test_scancel_cancels_at_once_and_stops_the_tasks(tmp_path, fake_slurm, monkeypatch):
    """CANCELLED at once (a task's SIGTERM handler can tell it from preemption), the task
    that ignores SIGTERM is killed KillWait later, and the waiting side gives up."""
    monkeypatch.setenv("FAKE_SLURM_KILL_WAIT", "1")
    job = executor(tmp_path / "logs").submit(Sleeper(tmp_path), 300)
    wait_for(tmp_path / "started-1", job)
    tasks = fake_slurm.wait_running(job.job_id)["tasks"]
    job.cancel()
    show = subprocess.run(["scontrol", "show", "job", job.job_id], capture_output=True, text=True)
    assert "JobState=CANCELLED" in show.stdout  # what a job's SIGTERM handler sees
    job._results_timeout_s = 0  # no result file will come
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        done(job).result()
    assert job.state.startswith("CANCELLED by")  # sacct's wording
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in tasks):
        assert time.time() < deadline, "the cancelled job's task still runs"
        time.sleep(0.05)
    assert fake_slurm.starts(job.job_id) == 1


def test_an_ltstudy_training_stage_runs_as_a_slurm_job(tmp_path, fake_slurm, micro_data):
    from ltstudy.launch import read_status
    from ltstudy.train import run_paths

    spec = micro_spec(tmp_path, micro_data)
    model = run_paths(spec)["model"]
    launch_stage("train", spec, {"model": str(model)}, launcher="slurm")
    assert model.exists()
    status = read_status(spec["run_dir"], "train")
    assert status["status"] == "done" and list(fake_slurm.jobs()) == [status["job_id"]]
    assert fake_slurm.wait_state(status["job_id"], "COMPLETED")["starts"] == 1
    assert (
        "#SBATCH --job-name=ltstudy-train-"
        in Path(status["log"]).parent.joinpath(f"{status['job_id']}_submission.sh").read_text()
    )


def test_the_commands_speak_slurms_formats(tmp_path, fake_slurm):
    """A plain batch script: #SBATCH options, output patterns, srun's ranks, squeue, sacct,
    scontrol, and a clear error for an option Slurm does not have."""
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --job-name=plain\n#SBATCH --output=%x-%j.out\n"
        "srun -n 2 sh -c 'echo rank $SLURM_PROCID local $SLURM_LOCALID of $SLURM_NTASKS'\n"
    )

    def slurm(*args: str) -> str:
        return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    job_id = slurm("sbatch", "--parsable", str(script)).strip()
    assert slurm("squeue", "-h", "-j", job_id, "-o", "%i %j") == f"{job_id} plain\n"
    fake_slurm.wait_state(job_id, "COMPLETED")
    lines = (tmp_path / f"plain-{job_id}.out").read_text().splitlines()
    assert sorted(lines) == ["rank 0 local 0 of 2", "rank 1 local 1 of 2"]
    assert slurm("sacct", "-P", "-o", "JobID,State,ExitCode", "-j", job_id).splitlines() == [
        "JobID|State|ExitCode",
        f"{job_id}|COMPLETED|0:0",
        f"{job_id}.batch|COMPLETED|0:0",
        f"{job_id}.0|COMPLETED|0:0",
    ]
    assert "JobState=COMPLETED" in slurm("scontrol", "show", "job", job_id)
    refused = subprocess.run(["sbatch", "--gpu=1", str(script)], capture_output=True, text=True)
    assert refused.returncode == 1 and "unrecognized option '--gpu'" in refused.stderr
