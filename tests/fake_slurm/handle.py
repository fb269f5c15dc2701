"""The tests' handle on the fake Slurm (what the `fake_slurm` fixture of tests/conftest.py
yields): its jobs, their states and starts, and signals to their tasks."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import commands
from .jobs import ACTIVE, POLL_S, alive, all_jobs, group_alive, kill_group, load, send

BIN = Path(__file__).resolve().parent


class FakeSlurm:
    """A test's handle on the fake Slurm: its jobs, their states and their processes."""

    def __init__(self, state_dir: Path, first_id: int = 1, kill_wait_s: float = 10.0):
        self.dir = Path(state_dir)
        self.first_id = first_id
        self.kill_wait_s = kill_wait_s

    def environment(self) -> dict[str, str]:
        """The variables that point the shims (first on PATH) at this fake Slurm."""
        return {
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FAKE_SLURM_DIR": str(self.dir),
            "FAKE_SLURM_PYTHON": sys.executable,
            "FAKE_SLURM_FIRST_ID": str(self.first_id),
            "FAKE_SLURM_KILL_WAIT": str(self.kill_wait_s),
        }

    def jobs(self) -> dict[str, str]:
        """Every job's state by job id."""
        return {job["id"]: job["state"] for job in all_jobs()}

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's whole record (state, starts, tasks, exit_code, ...)."""
        job = load(str(job_id))
        if job is None:
            raise KeyError(f"no fake Slurm job {job_id} in {self.dir}")
        return job

    def state(self, job_id: str) -> str:
        return self.job(job_id)["state"]

    def starts(self, job_id: str) -> int:
        """How many times the job's batch script was started."""
        return self.job(job_id)["starts"]

    def wait_state(self, job_id: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        """Wait until the job is in one of `states`; its record."""
        deadline = time.time() + timeout
        while (job := self.job(job_id))["state"] not in states:
            if time.time() > deadline:
                raise TimeoutError(
                    f"job {job_id} is {job['state']} after {timeout} s, not {states}"
                )
            time.sleep(POLL_S)
        return job

    def wait_running(self, job_id: str, tasks: int = 1, timeout: float = 60) -> dict[str, Any]:
        """Wait until the job runs with `tasks` live task processes; its record."""
        deadline = time.time() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] == "RUNNING" and sum(map(alive, job["tasks"])) >= tasks:
                return job
            if time.time() > deadline:
                raise TimeoutError(
                    f"job {job_id} is {job['state']} with tasks {job['tasks']} after {timeout} s"
                )
            time.sleep(POLL_S)

    def signal(self, job_id: str, sig: int) -> int:
        """Send `sig` to every task of the running job, as Slurm does at the warning time
        (USR2) or on preemption (SIGTERM); how many tasks got it."""
        job = self.job(job_id)
        sent = send(job, sig) if job["state"] in ACTIVE else 0
        if not sent:
            raise RuntimeError(f"job {job_id} ({job['state']}) has no running task to signal")
        return sent

    def preempt(self, job_id: str) -> None:
        """Preempt the job with PreemptMode=REQUEUE: SIGTERM, KillWait, run again."""
        commands.preempt(str(job_id))

    def cancel(self, job_id: str) -> None:
        commands.cancel(str(job_id))

    def shutdown(self, timeout: float = 10) -> list[str]:
        """Kill every job's supervisor and processes; the ids of jobs that still ran."""
        running = []
        if not (self.dir / "jobs").is_dir():
            return running
        for job in all_jobs():
            if alive(job["supervisor"]) or (job["pgid"] and group_alive(job["pgid"])):
                running.append(job["id"])
            with contextlib.suppress(ProcessLookupError):
                if alive(job["supervisor"]):
                    os.kill(job["supervisor"], signal.SIGKILL)  # first, so nothing restarts
            kill_group(job["pgid"])
        deadline = time.time() + timeout
        for job in all_jobs():
            while alive(job["supervisor"]) or (job["pgid"] and group_alive(job["pgid"])):
                if time.time() > deadline:
                    raise RuntimeError(f"fake Slurm job {job['id']} left processes behind")
                kill_group(job["pgid"])
                time.sleep(POLL_S)
        return running
