"""Every attempt of a stage, as its job saw it: when it ran, until when, and how it ended.

A stage may take several attempts: a job killed, preempted and requeued, or rerun by
Snakemake after a failure, each resuming from the last checkpoint. The job's main process
records its own attempt in `<work_dir>/status/<stage>.attempts.json` and refreshes it every
`HEARTBEAT_S` seconds, so an attempt that was killed outright (SIGKILL, the out-of-memory
killer, a lost node) still counts up to its last heartbeat. The wall time and GPU-hours of a
run sum all its attempts.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ltstudy.io import read_json, write_json

HEARTBEAT_S = 15.0


def attempts_path(work_dir: str | Path, stage: str) -> Path:
    return Path(work_dir) / "status" / f"{stage}.attempts.json"


def read_attempts(work_dir: str | Path, stage: str) -> list[dict[str, Any]]:
    path = attempts_path(work_dir, stage)
    try:
        return list(read_json(path)) if path.exists() else []
    except ValueError:  # a torn file cannot happen (atomic writes), a hand-edited one can
        return []


def clear_attempts(work_dir: str | Path, stage: str) -> None:
    """Start the count afresh: the stage computes from scratch."""
    attempts_path(work_dir, stage).unlink(missing_ok=True)


def close_attempts(work_dir: str | Path, stage: str, job_id: str) -> None:
    """End the attempts of a job that is gone without saying so (killed outright): the
    launcher noticed now, which bounds their end better than their last heartbeat."""
    attempts = read_attempts(work_dir, stage)
    open_ones = [a for a in attempts if a["job_id"] == job_id and "ended" not in a]
    for attempt in open_ones:
        attempt.update(ended=time.time(), outcome="killed")
    if open_ones:
        write_json(attempts_path(work_dir, stage), attempts)


def attempt_seconds(attempt: dict[str, Any]) -> float:
    end = attempt.get("ended", attempt.get("seen", attempt["started"]))
    return max(0.0, end - attempt["started"])


def total_seconds(work_dir: str | Path, stage: str) -> tuple[int, float]:
    """(number of attempts, seconds they ran in all)."""
    attempts = read_attempts(work_dir, stage)
    return len(attempts), sum(attempt_seconds(a) for a in attempts)


@contextlib.contextmanager
def recorded_attempt(work_dir: str | Path, stage: str, job_id: str) -> Iterator[None]:
    """Record this process's attempt at `stage` while the block runs (call it in one process
    per job: rank 0)."""
    attempts = read_attempts(work_dir, stage)
    now = time.time()
    mine = {"job_id": job_id, "host": socket.gethostname(), "pid": os.getpid()}
    mine.update(started=now, seen=now)
    attempts.append(mine)
    lock = threading.Lock()

    def save() -> None:
        with lock, contextlib.suppress(OSError):  # a full disk must not hide the real error
            write_json(attempts_path(work_dir, stage), attempts)

    save()
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            mine["seen"] = time.time()
            save()

    thread = threading.Thread(target=heartbeat, name="ltstudy-heartbeat", daemon=True)
    thread.start()
    outcome = "failed"
    try:
        yield
        outcome = "done"
    except SystemExit:  # submitit requeues a job by exiting it
        outcome = "requeued"
        raise
    finally:
        stop.set()
        thread.join()
        mine.update(ended=time.time(), outcome=outcome, cpu_s=_cpu_seconds())
        save()


def _cpu_seconds() -> float:
    """CPU time of this process and the children it waited for (the measure of where a CPU
    study's time goes: wall time also counts the waits for cores other jobs hold)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
