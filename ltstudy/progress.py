"""Live progress of a running stage, for the console and `ltstudy status`.

A job's output goes only to its log files, so the job's main process also keeps a small file,
`<work_dir>/status/<stage>.progress.json`: how far it is (done of total, in a unit), its rate,
the ETA and the last training loss. The launcher waiting on the job reads it and prints one
line now and then; `ltstudy status` shows it beside each running run.

Stage code calls `update(done, total, unit)` as it goes; it writes only inside `recording`
(which `launch.StageJob` opens on rank 0), so other ranks, tests and `ltstudy stage` pay nothing.
Writes are throttled to one every `WRITE_EVERY_S` seconds, and the last state is always written.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ltstudy.io import read_json, write_json

WRITE_EVERY_S = 2.0


def progress_path(work_dir: str | Path, stage: str) -> Path:
    return Path(work_dir) / "status" / f"{stage}.progress.json"


def read_progress(work_dir: str | Path, stage: str) -> dict[str, Any] | None:
    """The stage's last progress, or None if it wrote none (or the file is unreadable)."""
    path = progress_path(work_dir, stage)
    try:
        return read_json(path)
    except (OSError, ValueError):  # not there yet; a hand-edited file
        return None


class _Recorder:
    """Turns `update` calls into throttled writes of the progress file, measuring the rate
    from the first update (a resumed run's first step, not step 0)."""

    def __init__(self, work_dir: str | Path, stage: str) -> None:
        self.path, self.stage = progress_path(work_dir, stage), stage
        self.origin: tuple[int, float] | None = None
        self.state: dict[str, Any] | None = None
        self.written = 0.0
        self.pending = False

    def update(self, done: int, total: int | None, unit: str, loss: float | None) -> None:
        now = time.time()
        if self.origin is None:
            self.origin = (done, now)
        start, since = self.origin
        rate = (done - start) / (now - since) if done > start and now > since else None
        eta = (total - done) / rate if rate and total is not None else None
        self.state = {
            "stage": self.stage,
            "done": done,
            "total": total,
            "unit": unit,
            "rate": rate,
            "eta_s": eta,
            "loss": loss,
            "updated": now,
        }
        self.pending = True
        if now - self.written >= WRITE_EVERY_S or done == total:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            with contextlib.suppress(OSError):  # a full disk must not stop the job
                write_json(self.path, self.state)
            self.written, self.pending = time.time(), False


_recorder: _Recorder | None = None


@contextlib.contextmanager
def recording(work_dir: str | Path, stage: str) -> Iterator[None]:
    """Write this process's `update` calls to the stage's progress file while the block runs."""
    global _recorder
    _recorder = _Recorder(work_dir, stage)
    try:
        yield
    finally:
        _recorder.flush()
        _recorder = None


def update(done: int, total: int | None, unit: str, loss: float | None = None) -> None:
    """Report that `done` of `total` `unit` (None: unknown) are done; call it first before the
    work starts, so that the rate counts from there. Cheap: call it every step."""
    if _recorder is not None:
        _recorder.update(done, total, unit, loss)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def format_count(progress: Mapping[str, Any]) -> str:
    """'step 40/120 (33%)', '12/40 prompts (30%)', or '1,000 documents' when the total is
    unknown."""
    done, total, unit = progress["done"], progress["total"], progress["unit"]
    if not total:
        return f"{done:,} {unit.removesuffix('s') if done == 1 else unit}"
    share = f"({100 * done / total:.0f}%)"
    if unit == "steps":
        return f"step {done}/{total} {share}"
    return f"{done:,}/{total:,} {unit} {share}"


def remaining(progress: Mapping[str, Any], now: float | None = None) -> float | None:
    """Seconds left from `now`: the ETA the job wrote, less the time since it wrote it."""
    if progress.get("eta_s") is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, progress["eta_s"] - (now - progress["updated"]))


def progress_line(label: str, progress: Mapping[str, Any], now: float | None = None) -> str:
    """One console line: '[ltstudy] demo/full-demo-512 train: step 40/120 (33%) loss 2.3104,
    eta 1m12s'."""
    line = f"[ltstudy] {label} {progress['stage']}: {format_count(progress)}"
    if progress.get("loss") is not None:
        line += f" loss {progress['loss']:.4f}"
    left = remaining(progress, now)
    if left is not None:
        line += f", eta {format_duration(left)}"
    return line
