"""Job records of the fake Slurm (one JSON file per job under $FAKE_SLURM_DIR/jobs, changed
under one lock) and the signals Slurm sends to a job's processes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NODE = "localhost"  # the job's node name resolves everywhere: submitit rendezvous on node 0
PARTITION = "fake"
ACTIVE = ("PENDING", "REQUEUED", "RUNNING", "PREEMPTED", "COMPLETING")
COMPACT = {
    "PENDING": "PD",
    "REQUEUED": "RQ",
    "RUNNING": "R",
    "PREEMPTED": "PR",
    "COMPLETING": "CG",
    "COMPLETED": "CD",
    "FAILED": "F",
    "CANCELLED": "CA",
    "TIMEOUT": "TO",
}
POLL_S = 0.05


class SlurmError(Exception):
    """A command's error: printed as `<command>: error: <message>`, exit status 1."""


def root() -> Path:
    value = os.environ.get("FAKE_SLURM_DIR")
    if not value:
        raise SlurmError("FAKE_SLURM_DIR is not set (the fake Slurm's state folder)")
    (Path(value) / "jobs").mkdir(parents=True, exist_ok=True)
    return Path(value)


@contextlib.contextmanager
def locked() -> Iterator[None]:
    with open(root() / "lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _record(job_id: str) -> Path:
    return root() / "jobs" / f"{job_id}.json"


def load(job_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(_record(job_id).read_text())
    except FileNotFoundError:
        return None


def _save(job: dict[str, Any]) -> None:
    path = _record(job["id"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(job, indent=1))
    os.replace(tmp, path)  # readers never see half a record


@contextlib.contextmanager
def update(job_id: str) -> Iterator[dict[str, Any]]:
    """Read-modify-write one job's record under the fake Slurm's lock."""
    with locked():
        job = load(job_id)
        if job is None:
            raise SlurmError(f"Invalid job id specified: {job_id}")
        yield job
        _save(job)


def create(job: dict[str, Any]) -> None:
    with locked():
        _save(job)


def all_jobs() -> list[dict[str, Any]]:
    jobs = [json.loads(p.read_text()) for p in (root() / "jobs").glob("*.json")]
    return sorted(jobs, key=lambda job: int(job["id"]))


def next_id() -> str:
    with locked():
        path = root() / "next_id"
        job_id = (
            int(path.read_text())
            if path.exists()
            else int(os.environ.get("FAKE_SLURM_FIRST_ID", 1))
        )
        path.write_text(str(job_id + 1))
    return str(job_id)


def user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def alive(pid: int | None) -> bool:
    """Whether `pid` is a live process (a zombie is not)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(_in_group(pid, pgid) for pid in _pids())


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _in_group(pid: int, pgid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and int(fields[2]) == pgid  # state, ppid, pgrp


def kill_group(pgid: int | None, sig: int = signal.SIGKILL) -> None:
    if pgid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def send(job: dict[str, Any], sig: int, *, batch: bool = False, full: bool = False) -> int:
    """Signal a running job as `scancel --signal` does: every task of its steps (the batch
    shell instead with `batch`, both with `full`). Returns how many processes got it."""
    pids = ([job.get("batch_pid")] if batch or full else []) + ([] if batch else job["tasks"])
    sent = 0
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                sent += 1
    return sent


def terminate(job: dict[str, Any]) -> None:
    """End a running job as Slurm does: SIGTERM to its tasks (to the batch shell before any
    step started), SIGKILL to all that is left KillWait later (the supervisor does that)."""
    if not job.get("pgid"):
        return
    if not send(job, signal.SIGTERM):
        send(job, signal.SIGTERM, batch=True)
    job["kill_at"] = time.time() + job["kill_wait_s"]


def expand(pattern: str, job: dict[str, Any], task: int = 0, step: int | None = None) -> str:
    """An output file name: %j %J %A %a %x %t %N %n %u %s %% (with optional zero padding)."""
    per_node = job["ntasks_per_node"]
    values = {
        "j": job["id"],
        "J": job["id"] if step is None else f"{job['id']}.{step}",
        "A": job["id"],
        "a": "4294967294",  # Slurm's value outside job arrays
        "x": job["name"],
        "t": str(task),
        "N": NODE,
        "n": str(task // per_node),
        "u": job["user"],
        "s": "batch" if step is None else str(step),
    }

    def one(found: re.Match) -> str:
        return "%" if found[2] == "%" else values[found[2]].zfill(int(found[1] or 0))

    name = re.sub(r"%(\d*)([%jJAaxtNnus])", one, pattern)
    return str(Path(job["workdir"], name))
