"""Gather per-run Parquet files into one table each, and build the runs table."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import polars as pl

from ltstudy.launch import read_status
from ltstudy.progress import read_progress
from ltstudy.results.schemas import (
    RUN_FILES,
    TABLE_STAGE,
    TABLES,
    check_schema,
    table_frame,
    write_table,
)

# `ltstudy collect` writes here, inside results_dir and reports_dir: Snakemake owns the tables
# and the report proper, and a partial table newer than its inputs would never be rebuilt.
PARTIAL = "partial"
LISTED_IDS = 10  # run ids named per kind in the partial report's banner


class RunFileError(ValueError):
    """A per-run file that cannot be read: the message names it and how to rebuild it."""


def read_run_file(table: str, path: str | Path) -> pl.DataFrame:
    rebuild = (
        f"to rebuild it, delete it and rerun snakemake, or add `--forcerun {path}` to the "
        "snakemake command"
    )
    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise RunFileError(f"{path}: not a readable Parquet file ({reason}); {rebuild}") from None
    try:
        check_schema(table, frame.schema, where=str(path))
    except ValueError as err:
        raise RunFileError(f"{err}; {rebuild}") from None
    return frame


def collect_table(
    table: str, run_files: Iterable[str | Path], out_path: str | Path
) -> pl.DataFrame:
    frames = [read_run_file(table, path) for path in run_files]
    result = pl.concat(frames, how="vertical") if frames else table_frame(table, [])
    write_table(table, result, out_path)
    return result


def run_status(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Status of a run from its stages' status files: done, failed (with reason), running or
    pending; with the wall time, GPU-hours and attempts of every stage's jobs, failed and
    interrupted attempts included. `stage` names the failed stage or the running ones, and
    `progress` is the first running stage's last progress (ltstudy.progress), if any."""
    stages = {s: read_status(spec["run_dir"], s) for s in spec["stages"]}
    recorded = [st for st in stages.values() if st]
    usage = {
        "wall_s": sum(st.get("wall_s", 0.0) for st in recorded),
        "gpu_hours": sum(st.get("wall_s", 0.0) * st.get("gpus", 0) for st in recorded) / 3600,
        "attempts": sum(st.get("attempts", 0) for st in recorded),
        "world_size": (stages.get("train") or {}).get("world_size"),
        "context_parallel": (stages.get("train") or {}).get("context_parallel"),
    }
    failed = {s: st for s, st in stages.items() if st and st["status"] == "failed"}
    if failed:
        stage, st = next(iter(failed.items()))
        reason, log = st.get("reason", ""), st.get("log")
        failure = {"error": f"{stage}: {reason} (log {log})", "reason": reason, "log": log}
        return {"status": "failed", "stage": stage, "progress": None, **failure, **usage}
    states = [st["status"] if st else "pending" for st in stages.values()]
    running = [s for s, state in zip(stages, states, strict=True) if state == "running"]
    if all(s == "done" for s in states):
        status = "done"
    elif running:
        status = "running"
    else:
        status = "pending"
    found = (read_progress(spec["run_dir"], s) for s in running)
    now = {"stage": "+".join(running) or None, "progress": next(filter(None, found), None)}
    return {"status": status, "error": None, **now, **usage}


def runs_frame(specs: Mapping[str, Mapping[str, Any]], curves: pl.DataFrame) -> pl.DataFrame:
    """One row per run; `final_loss` is the last loss of its training curve in `curves`."""
    from ltstudy.models.transformer import count_parameters

    last = curves.group_by("run_id").agg(pl.col("loss").sort_by("step").last())
    final_losses = dict(last.iter_rows())
    rows = []
    for run_id, spec in specs.items():
        counts = count_parameters(spec["model"])
        trains = "train" in spec["stages"]
        rows.append(
            {
                "run_id": run_id,
                "study": spec["study"],
                "name": spec["name"],
                "variant": spec["variant"],
                "size": spec["size"],
                "context": spec["context"],
                "seed": spec["seed"],
                "config_hash": spec["config_hash"],
                "params": counts["total"],
                "params_non_embedding": counts["non_embedding"],
                "train_steps": spec["train"]["steps"] if trains else 0,
                "train_tokens": spec["train"]["tokens"] if trains else 0,
                "final_loss": final_losses.get(run_id),
                "config": json.dumps(spec, sort_keys=True),
                **run_status(spec),
            }
        )
    return table_frame("runs", rows).select(TABLES["runs"].names())


def collect_runs(
    specs: Mapping[str, Mapping[str, Any]], curves_path: str | Path, out_path: str | Path
) -> pl.DataFrame:
    """The runs table, with final losses from the collected training curves at `curves_path`."""
    frame = runs_frame(specs, pl.read_parquet(curves_path))
    write_table("runs", frame, out_path)
    return frame


def collect_available(
    specs: Mapping[str, Mapping[str, Any]],
    results_dir: str | Path,
    on_skip: Callable[[str, str], None] | None = None,
) -> dict[str, pl.DataFrame]:
    """Every table from the per-run files that exist now, and the runs table with each run's
    status (failed runs carry their reason), written to <results_dir>/partial/: a partial view
    while runs fail or are pending. An unreadable file is skipped: `on_skip(run_id, message)`."""
    out = Path(results_dir) / PARTIAL
    tables = {}
    for table, file in RUN_FILES.items():
        frames = []
        for run_id, spec in specs.items():
            path = Path(spec["run_dir"]) / file
            if not path.exists():
                continue
            try:
                frames.append(read_run_file(table, path))
            except RunFileError as err:
                if on_skip:
                    on_skip(run_id, str(err))
        tables[table] = pl.concat(frames) if frames else table_frame(table, [])
        write_table(table, tables[table], out / f"{table}.parquet")
    tables["runs"] = runs_frame(specs, tables["train_curves"])
    write_table("runs", tables["runs"], out / "runs.parquet")
    return tables


def incomplete_runs(
    specs: Mapping[str, Mapping[str, Any]], runs: pl.DataFrame, unreadable: Iterable[str] = ()
) -> dict[str, list[str]]:
    """Runs missing from a partial view, by kind: failed, running, pending, or missing (done,
    but a per-run file is absent or unreadable)."""
    unreadable = set(unreadable)
    kinds: dict[str, list[str]] = {"failed": [], "running": [], "pending": [], "missing": []}
    for run_id, status in runs.select("run_id", "status").iter_rows():
        spec = specs[run_id]
        files = [RUN_FILES[t] for t, stage in TABLE_STAGE.items() if stage in spec["stages"]]
        absent = any(not (Path(spec["run_dir"]) / f).exists() for f in files)
        if status != "done":
            kinds.setdefault(status, []).append(run_id)
        elif absent or run_id in unreadable:
            kinds["missing"].append(run_id)
    return kinds


def partial_banner(incomplete: Mapping[str, list[str]], total: int) -> str:
    """One paragraph for the partial report: how many runs it lacks, and which."""
    lacking = sum(len(ids) for ids in incomplete.values())
    parts = []
    for kind, ids in incomplete.items():
        if ids:
            more = f" and {len(ids) - LISTED_IDS} more" if len(ids) > LISTED_IDS else ""
            parts.append(f"{kind} {len(ids)} ({', '.join(ids[:LISTED_IDS])}{more})")
    return (
        f"Partial results from `ltstudy collect`: {total - lacking} of {total} runs complete; "
        f"{lacking} missing: {'; '.join(parts) or 'none'}. `snakemake all` writes the complete "
        "tables and report."
    )
