"""Telling Slurm's preemption from a cancellation, and requeueing on either signal.

Slurm sends USR2 `signal_delay_s` before a job's time limit (`--signal`), and SIGTERM when it
preempts the job or when someone runs `scancel`. submitit requeues a Checkpointable job on USR2
only; a preempted job must be requeued too (or it is lost when Slurm does not requeue it
itself), and a cancelled one must not be. The job's state, as `scontrol` reports it while the
job is still being signalled, tells them apart.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import Any

REQUEUED_STATES = ("REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED", "PENDING")


def slurm_job_state() -> str | None:
    """This Slurm job's state (None outside Slurm, UNKNOWN if scontrol does not say)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", job], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "UNKNOWN"
    found = re.search(r"JobState=(\w+)", out)
    return found.group(1) if found else "UNKNOWN"


def slurm_preempted(requeued_only: bool = False) -> bool:
    """Whether a SIGTERM came from Slurm preempting this job rather than from `scancel`.
    `requeued_only`: whether Slurm is requeueing the job itself."""
    state = slurm_job_state()
    if state is None:
        return False
    return state in REQUEUED_STATES if requeued_only else state != "CANCELLED"


def requeue(signum: int, handler: Any) -> None:
    """Requeue the job if `signum` asks for it (USR2 always, SIGTERM when Slurm preempted
    the job) and submitit runs it (`handler`: submitit's USR2 handler, which requeues and then
    exits on rank 0). Every rank then exits without a result, so the waiting side follows the
    requeued job; otherwise this returns."""
    if not callable(handler):  # not a submitit job
        return
    if signum == signal.SIGTERM and not slurm_preempted():
        return
    print(f"[ltstudy] {signal.Signals(signum).name}: requeueing", flush=True)
    try:
        handler(signal.SIGUSR2, None)
    except subprocess.CalledProcessError:  # `scontrol requeue` refused: Slurm requeues it?
        if not slurm_preempted(requeued_only=True):
            raise
        print("[ltstudy] Slurm requeues the job itself", flush=True)
    sys.exit(-1)


def requeue_on_preemption() -> None:
    """In a job that has nothing to save (data, evaluation): make Slurm's SIGTERM requeue it
    as USR2 does, unless the job was cancelled."""
    usr2 = signal.getsignal(signal.SIGUSR2)
    if callable(usr2):
        signal.signal(signal.SIGTERM, lambda signum, frame: requeue(signum, usr2))
