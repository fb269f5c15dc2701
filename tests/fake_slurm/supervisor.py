"""The supervisor of one job: runs its batch script (again when requeued), enforces its time
limit and KillWait, records its states. One detached process per job, started by sbatch."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .jobs import (
    NODE,
    POLL_S,
    expand,
    group_alive,
    kill_group,
    load,
    root,
    send,
    terminate,
    update,
)

CLI = Path(__file__).with_name("cli.py")


def start(job_id: str) -> None:
    """Start the job's supervisor, detached from the caller (sbatch, scontrol requeue)."""
    with open(root() / "jobs" / f"{job_id}.supervisor.log", "a") as log:
        proc = subprocess.Popen(
            [sys.executable, str(CLI), "_supervise", job_id],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives sbatch, like a job outlives its submitter
        )
    with update(job_id) as job:
        job["supervisor"] = proc.pid


def _job_env(job: dict[str, Any]) -> dict[str, str]:
    """The submitter's environment (sbatch's --export=ALL) with Slurm's job variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SLURMD_"))}
    nodes, per_node = job["nodes"], job["ntasks_per_node"]
    nodelist = ",".join([NODE] * nodes)
    env.update(
        SLURM_JOB_ID=job["id"],
        SLURM_JOBID=job["id"],
        SLURM_JOB_NAME=job["name"],
        SLURM_JOB_USER=job["user"],
        SLURM_JOB_UID=str(os.getuid()),
        SLURM_JOB_PARTITION=job["partition"],
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_NNODES=str(nodes),
        SLURM_JOB_NODELIST=nodelist,
        SLURM_NODELIST=nodelist,
        SLURM_NTASKS=str(nodes * per_node),
        SLURM_NPROCS=str(nodes * per_node),
        SLURM_NTASKS_PER_NODE=str(per_node),
        SLURM_TASKS_PER_NODE=f"{per_node}(x{nodes})" if nodes > 1 else str(per_node),
        SLURM_NODEID="0",
        SLURMD_NODENAME=NODE,
        SLURM_SUBMIT_DIR=job["workdir"],
        SLURM_SUBMIT_HOST=NODE,
        SLURM_CLUSTER_NAME="fake",
        SLURM_RESTART_COUNT=str(job["starts"] - 1),
    )
    for option, name in (
        ("cpus-per-task", "SLURM_CPUS_PER_TASK"),
        ("gpus-per-node", "SLURM_GPUS_PER_NODE"),
    ):
        if option in job["options"]:
            env[name] = str(job["options"][option])
    return env


def _reap(batch_pid: int, status: int | None) -> int | None:
    """Collect exited children (orphans come to the supervisor); the batch shell's exit code."""
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        if pid == batch_pid:
            status = os.waitstatus_to_exitcode(wait_status)


def _police(job_id: str) -> None:
    """Time limit, its warning signal and KillWait, checked while the attempt runs."""
    job = load(job_id)
    now = time.time()
    limit, warning = job["time_limit_s"], job["warning"]
    if (
        limit is not None
        and warning
        and not job["warned"]
        and now - job["start_time"] >= limit - warning[1]
    ):
        with update(job_id) as job:
            job["warned"] = True
            send(job, warning[0], batch=warning[2])
    if limit is not None and job["state"] == "RUNNING" and now - job["start_time"] >= limit:
        with update(job_id) as job:
            if job["state"] == "RUNNING":
                job["state"] = "TIMEOUT"
                terminate(job)
    if job["kill_at"] and now >= job["kill_at"]:
        kill_group(job["pgid"])


def _run_attempt(job: dict[str, Any]) -> int:
    """Run the batch script once; its exit code (negative: the signal that killed it)."""
    mode = "a" if job["open_mode"] == "append" else "w"
    try:
        with contextlib.ExitStack() as files:
            out = files.enter_context(open(expand(job["output"], job), mode))
            err = (
                files.enter_context(open(expand(job["error"], job), mode)) if job["error"] else out
            )
            proc = subprocess.Popen(
                ["bash", job["script"], *job["args"]],
                cwd=job["workdir"],
                env=_job_env(job),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # the attempt's process group: what KillWait kills
            )
    except OSError as error:  # Slurm fails such a job without a log
        print(f"job {job['id']}: cannot start: {error}", flush=True)
        return 1
    with update(job["id"]) as record:
        record["batch_pid"] = record["pgid"] = proc.pid
        if record["state"] != "RUNNING":  # cancelled or requeued while starting
            terminate(record)
    status = None
    while True:
        status = _reap(proc.pid, status)
        if status is not None:
            kill_group(proc.pid)  # the batch script ended: so does the job, and all in it
            if not group_alive(proc.pid):
                break
        else:
            _police(job["id"])
        time.sleep(POLL_S)
    proc.returncode = status  # reaped above
    return status


def supervise(job_id: str) -> None:
    """Run the job's batch script until it ends without being requeued."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: the attempt's orphans are ours to reap
    time.sleep(load(job_id)["start_delay_s"])  # pending in the queue
    while True:
        with update(job_id) as job:
            if job["state"] not in ("PENDING", "REQUEUED"):
                return  # cancelled while pending
            job.update(
                state="RUNNING",
                attempt=True,
                starts=job["starts"] + 1,
                start_time=time.time(),
                end_time=None,
                requeue=False,
                kill_at=None,
                warned=False,
                steps=0,
                tasks=[],
            )
        status = _run_attempt(job)
        with update(job_id) as job:
            job.update(attempt=False, batch_pid=None, pgid=None, tasks=[], kill_at=None)
            job["end_time"] = time.time()
            job["exit_code"] = f"{status}:0" if status >= 0 else f"0:{-status}"
            if job["requeue"]:
                job["state"] = "REQUEUED"
            elif job["state"] in ("RUNNING", "COMPLETING"):
                job["state"] = "COMPLETED" if status == 0 else "FAILED"
            delay = job["requeue_delay_s"] if job["state"] == "REQUEUED" else None
        if delay is None:
            return
        time.sleep(delay)
        with update(job_id) as job:
            if job["state"] == "REQUEUED":
                job["state"] = "PENDING"
