"""Run one stage of one run as a submitit job and wait for it.

Snakemake runs with its local executor; each GPU rule calls `launch`, which submits the stage
through submitit (Slurm on a cluster, local processes elsewhere, in-process for tests), waits,
and raises `LaunchError` naming the run and the job's log when the job fails. Job logs and a
status file per stage live in the run's folder:

    <work_dir>/spec.json                          the resolved spec (config and seed) it ran with
    <work_dir>/logs/<stage>/<job_id>_0_log.{out,err}   the job's output
    <work_dir>/status/<stage>.json                running | done | failed (+ reason, job, timing)
    <work_dir>/status/<stage>.progress.json       how far the job is (ltstudy.progress)

While it waits, `launch` prints a line of the job's progress to the console (Snakemake's) every
`PRINT_EVERY_S` seconds at most, when it changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import submitit

from ltstudy.attempts import clear_attempts, close_attempts, recorded_attempt, total_seconds
from ltstudy.failures import failure_reason
from ltstudy.io import read_json, write_json
from ltstudy.preemption import requeue_on_preemption
from ltstudy.progress import progress_line, progress_path, read_progress, recording

LAUNCHERS = ("local", "slurm", "debug")
# Snakemake resources that carry submitit/Slurm settings (strings may come from the profile's
# default-resources; numbers are declared by each rule from the run's config).
STRING_RESOURCES = ("slurm_partition", "slurm_account", "slurm_qos", "constraint")
# How often the waiting side reads a job's progress file, and prints it at most (per job: a
# study waits on many jobs at once and their lines must not flood the console).
POLL_EVERY_S = 5.0
PRINT_EVERY_S = 30.0


class LaunchError(RuntimeError):
    """A stage's job failed; the message names the run and the job's log file."""


class StageJob(submitit.helpers.Checkpointable):
    """The picklable callable a submitit job runs: one stage for one payload.

    Being Checkpointable lets submitit requeue the job on preemption or at its time limit; a
    requeued training job resumes from the checkpoint it wrote when it received the signal.
    The job's rank 0 records its attempt (start, heartbeat, end) for the run's accounting,
    and its progress for the console.
    """

    def __init__(self, stage: str, work_dir: str | Path | None = None):
        self.stage = stage
        self.work_dir = None if work_dir is None else str(work_dir)

    def __call__(self, payload: Mapping[str, Any], outputs: Mapping[str, str]) -> Any:
        from ltstudy.jobs import SPLIT, run_stage

        requeue_on_preemption()
        job_id, rank = _job_identity()
        if rank != 0 and self.stage not in SPLIT:  # a one-process stage: the first rank's
            return None
        if rank != 0 or self.work_dir is None:
            return run_stage(self.stage, payload, outputs)
        with (
            recorded_attempt(self.work_dir, self.stage, job_id),
            recording(self.work_dir, self.stage),
        ):
            return run_stage(self.stage, payload, outputs)


def _job_identity() -> tuple[str, int]:
    """(job id, global rank) of the submitit job this process runs, or an in-process run's."""
    try:
        env = submitit.JobEnvironment()
        return str(env.job_id), env.global_rank
    except RuntimeError:  # not inside a submitit job
        return "inline", 0


def submitit_parameters(resources: Mapping[str, Any], launcher: str, name: str) -> dict[str, Any]:
    """Map Snakemake/config resource names to the parameters of the chosen submitit executor."""
    gpus = int(resources.get("gpu", 0) or 0)
    common = {
        "timeout_min": int(resources.get("runtime", 60)),
        "gpus_per_node": gpus,
        "tasks_per_node": int(resources.get("tasks_per_node", 1)),
    }
    if launcher == "local":
        if int(resources.get("nodes", 1)) != 1:
            raise LaunchError(
                f"{name}: the local launcher runs on one node; set resources nodes: 1"
            )
        return {**common, "signal_delay_s": int(resources.get("signal_delay_s", 120))}
    params = {
        **common,
        "name": name,
        "nodes": int(resources.get("nodes", 1)),
        "cpus_per_task": int(resources.get("cpus_per_task", 1)),
        "mem_gb": math.ceil(int(resources.get("mem_mb", 1024)) / 1024),
    }
    if launcher == "slurm":
        params["slurm_signal_delay_s"] = int(resources.get("signal_delay_s", 120))
        for key in STRING_RESOURCES:
            value = resources.get(key)
            if value:
                params["slurm_" + key.removeprefix("slurm_")] = str(value)
    return params


def make_executor(launcher: str, folder: Path, params: Mapping[str, Any]) -> submitit.Executor:
    if launcher not in LAUNCHERS:
        raise LaunchError(f"unknown launcher {launcher!r} (known: {', '.join(LAUNCHERS)})")
    if launcher == "local":
        executor = submitit.LocalExecutor(folder=folder)
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster=launcher)
    executor.update_parameters(**params)
    return executor


@contextlib.contextmanager
def claimed_local_gpus(n: int) -> Iterator[list[int]]:
    """Hold `n` GPUs of this machine for the job (lock files), so concurrent local jobs do not
    all land on GPU 0 as submitit's local executor would place them."""
    if n == 0:
        yield []
        return
    import torch

    total = torch.cuda.device_count()
    if total < n:
        raise LaunchError(f"the job asks for {n} GPU(s) but this machine has {total}")
    lock_dir = Path(tempfile.gettempdir()) / "ltstudy-gpu-locks"
    lock_dir.mkdir(exist_ok=True)
    held: list[tuple[int, Any]] = []
    try:
        while len(held) < n:
            for index in range(total):
                if len(held) == n or any(i == index for i, _ in held):
                    continue
                handle = open(lock_dir / f"gpu{index}.lock", "w")  # noqa: SIM115
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held.append((index, handle))
                except BlockingIOError:
                    handle.close()
            if len(held) < n:
                time.sleep(5)
        yield [i for i, _ in held]
    finally:
        for _, handle in held:
            handle.close()


def status_path(work_dir: str | Path, stage: str) -> Path:
    return Path(work_dir) / "status" / f"{stage}.json"


def read_status(work_dir: str | Path, stage: str) -> dict[str, Any] | None:
    path = status_path(work_dir, stage)
    return read_json(path) if path.exists() else None


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """While waiting, treat SIGTERM (Snakemake stopping its jobs) like Ctrl-C, so that a local
    job is cancelled instead of left running behind a dead rule."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _printed_progress(work_dir: Path, stage: str, label: str) -> Iterator[None]:
    """While the block waits on the job, print its progress when it changed, at most every
    `PRINT_EVERY_S` seconds (the first line as soon as there is one)."""
    stop = threading.Event()

    def watch() -> None:
        shown, printed = None, -math.inf
        while not stop.wait(POLL_EVERY_S):
            progress = read_progress(work_dir, stage)
            changed = progress is not None and progress.get("done") != shown
            if changed and time.monotonic() - printed >= PRINT_EVERY_S:
                print(progress_line(label, progress), flush=True)
                shown, printed = progress["done"], time.monotonic()

    thread = threading.Thread(target=watch, name="ltstudy-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def launch(
    stage: str,
    payload: Mapping[str, Any],
    *,
    label: str,
    work_dir: str | Path,
    outputs: Mapping[str, str],
    resources: Mapping[str, Any],
    launcher: str,
) -> Any:
    """Submit `stage` for `payload`, wait for it, and check that it wrote its outputs."""
    work_dir = Path(work_dir)
    name = f"ltstudy-{stage}-{label}".replace("/", "-")
    params = submitit_parameters(resources, launcher, name)
    previous = read_status(work_dir, stage)
    config = payload.get("config_hash")
    if previous is None or previous["status"] == "done" or previous.get("config_hash") != config:
        clear_attempts(work_dir, stage)  # a fresh computation; otherwise this one resumes
    progress_path(work_dir, stage).unlink(missing_ok=True)  # a previous job's
    status = {
        "stage": stage,
        "run": label,
        "launcher": launcher,
        "config_hash": config,
        "status": "running",
        "started": time.time(),
    }

    def record(**updates: Any) -> None:
        attempts, seconds = total_seconds(work_dir, stage)
        status.update(attempts=attempts, wall_s=seconds, **updates)
        try:
            write_json(status_path(work_dir, stage), status)
        except OSError as err:  # a full disk: say what could not be recorded, go on
            print(f"[ltstudy] {label} {stage}: cannot record status {status}: {err}", flush=True)

    write_json(work_dir / "spec.json", payload)
    gpus_used = params["gpus_per_node"] * int(resources.get("nodes", 1))
    with claimed_local_gpus(params["gpus_per_node"] if launcher == "local" else 0) as gpus:
        if gpus:
            params["visible_gpus"] = gpus
        executor = make_executor(launcher, work_dir / "logs" / stage, params)
        job = executor.submit(StageJob(stage, work_dir), dict(payload), dict(outputs))
        if launcher == "local":  # a local job's result file is there at once, if ever (on a
            job._results_timeout_s = 1  # cluster's shared filesystem submitit waits 15 s)
        log = str(job.paths.stdout)
        record(job_id=str(job.job_id), log=log, stderr=str(job.paths.stderr), gpus=gpus_used)
        print(f"[ltstudy] {label} {stage}: {launcher} job {job.job_id}, log {log}", flush=True)
        try:
            with _terminate_as_interrupt(), _printed_progress(work_dir, stage, label):
                result = job.results()[0]  # rank 0's; every task must succeed
        except KeyboardInterrupt:
            if launcher == "local":
                job.cancel(check=False)
                close_attempts(work_dir, stage, str(job.job_id))
            record(status="failed", reason="interrupted while waiting", finished=time.time())
            raise
        except Exception as err:
            reason = failure_reason(err, job.paths.stderr)
            close_attempts(work_dir, stage, str(job.job_id))
            record(status="failed", reason=reason, finished=time.time())
            raise LaunchError(
                f"{label}: stage {stage} failed ({launcher} job {job.job_id}): {reason}\n"
                f"  job log: {log}\n  job errors: {job.paths.stderr}"
            ) from None
    missing = [p for p in outputs.values() if not os.path.exists(p)]
    if missing:
        record(status="failed", reason=f"missing outputs {missing}", finished=time.time())
        raise LaunchError(f"{label}: stage {stage} finished without writing {missing}; see {log}")
    ranks = params["tasks_per_node"] * int(resources.get("nodes", 1))
    record(
        status="done",
        finished=time.time(),
        world_size=result.get("world_size", ranks) if isinstance(result, dict) else ranks,
        context_parallel=result.get("context_parallel", 1) if isinstance(result, dict) else 1,
    )
    return result
