"""Why a job failed, in one line: the root cause, not the log.

submitit reports a job that raised with its whole traceback, and a job that died without a
result (killed, out of memory, a full disk that kept it from writing its result) with a dump
of its log. The status file, `ltstudy status` and the runs table need the cause: a full disk,
an out-of-memory kill, a signal, a Slurm state, or the Python exception's type and message.
"""

from __future__ import annotations

import re
from pathlib import Path

MAX_CHARS = 400
# (pattern in the error or the job's log, what it means), most specific first
_CAUSES = (
    (re.compile(r"No space left on device|\[Errno 28\]|ENOSPC"), "disk full (ENOSPC)"),
    (
        re.compile(r"CUDA out of memory|OutOfMemoryError|MemoryError|oom[-_ ]kill", re.I),
        "out of memory",
    ),
    (re.compile(r"Bus error|SIGBUS"), "bus error (SIGBUS: a memory-mapped file shrank?)"),
)
_SLURM_STATES = {
    "OUT_OF_MEMORY": "out of memory (Slurm state OUT_OF_MEMORY)",
    "TIMEOUT": "time limit reached (Slurm state TIMEOUT)",
    "CANCELLED": "cancelled (Slurm state CANCELLED: scancel, or an administrator)",
    "NODE_FAIL": "a node of the job failed (Slurm state NODE_FAIL)",
    "PREEMPTED": "preempted and not requeued (Slurm state PREEMPTED)",
    "BOOT_FAIL": "its node failed to boot (Slurm state BOOT_FAIL)",
    "DEADLINE": "deadline reached (Slurm state DEADLINE)",
}
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Interrupted|Exit)\b.*)$")


def one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 3] + "..."


def _tail(path: str | Path | None, chars: int = 20000) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _last_exception(text: str) -> str | None:
    """The last `SomeError: message` line of a traceback in `text`."""
    lines = [ln.strip() for ln in text.splitlines()]
    found = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
    return found[-1] if found else None


def failure_reason(error: BaseException, stderr: str | Path | None = None) -> str:
    """One line naming the root cause of a failed job, from submitit's error and the job's
    error log."""
    import submitit

    text = str(error)
    evidence = text + "\n" + _tail(stderr)
    for pattern, cause in _CAUSES:
        match = pattern.search(evidence)
        if match:
            line = next(ln for ln in evidence.splitlines() if pattern.search(ln))
            return one_line(f"{cause}: {line.strip()}")
    if isinstance(error, submitit.core.utils.FailedJobError):
        return one_line(_last_exception(text) or text or type(error).__name__)
    if isinstance(error, submitit.core.utils.UncompletedJobError):
        state = re.search(r"\(state: ([A-Z_]+)", text)
        state = state.group(1) if state else "UNKNOWN"
        if state in _SLURM_STATES:
            return _SLURM_STATES[state]
        raised = _last_exception(_tail(stderr))
        if raised:
            return one_line(raised)
        return (
            "the job ended without a result or a Python error: its process was killed by a "
            f"signal (SIGKILL, the out-of-memory killer) or its node was lost (state {state})"
        )
    return one_line(f"{type(error).__name__}: {text}" if text else type(error).__name__)
