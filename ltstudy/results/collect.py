"""Gather per-run Parquet files into one table each, and build the runs table."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import polars as pl

from ltstudy.launch import read_status
from ltstudy.results.schemas import RUN_FILES, TABLES, check_schema, table_frame, write_table


def collect_table(table: str, run_files: Iterable[str | Path], out_path: str | Path) -> pl.DataFrame:
    frames = []
    for path in run_files:
        frame = pl.read_parquet(path)
        check_schema(table, frame.schema, where=str(path))
        frames.append(frame)
    result = pl.concat(frames, how="vertical") if frames else table_frame(table, [])
    write_table(table, result, out_path)
    return result


def run_status(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Status of a run from its stages' status files: done, failed (with reason), running or pending."""
    stages = {s: read_status(spec["run_dir"], s) for s in spec["stages"]}
    failed = {s: st for s, st in stages.items() if st and st["status"] == "failed"}
    if failed:
        stage, st = next(iter(failed.items()))
        return {"status": "failed", "error": f"{stage}: {st.get('reason', '')} (log {st.get('log')})"}
    states = [st["status"] if st else "pending" for st in stages.values()]
    if all(s == "done" for s in states):
        status = "done"
    elif "running" in states:
        status = "running"
    else:
        status = "pending"
    wall = sum(st.get("wall_s", 0.0) for st in stages.values() if st)
    gpu_s = sum(st.get("wall_s", 0.0) * st.get("gpus", 0) for st in stages.values() if st)
    world = (stages.get("train") or {}).get("world_size")
    return {
        "status": status,
        "error": None,
        "wall_s": wall,
        "gpu_hours": gpu_s / 3600,
        "world_size": world,
    }


def runs_frame(specs: Mapping[str, Mapping[str, Any]]) -> pl.DataFrame:
    from ltstudy.models.transformer import count_parameters

    rows = []
    for run_id, spec in specs.items():
        counts = count_parameters(spec["model"])
        curve_path = Path(spec["run_dir"]) / "train_curve.parquet"
        final_loss = None
        if curve_path.exists():
            curve = pl.read_parquet(curve_path)
            final_loss = float(curve["loss"][-1]) if curve.height else None
        trains = "train" in spec["stages"]
        rows.append({
            "run_id": run_id, "study": spec["study"], "name": spec["name"],
            "variant": spec["variant"], "size": spec["size"], "context": spec["context"],
            "seed": spec["seed"], "config_hash": spec["config_hash"],
            "params": counts["total"], "params_non_embedding": counts["non_embedding"],
            "train_steps": spec["train"]["steps"] if trains else 0,
            "train_tokens": spec["train"]["tokens"] if trains else 0,
            "final_loss": final_loss, "wall_s": 0.0, "gpu_hours": 0.0,
            "config": json.dumps(spec, sort_keys=True),
            **run_status(spec),
        })
    return table_frame("runs", rows).select(TABLES["runs"].names())


def collect_available(
    specs: Mapping[str, Mapping[str, Any]], results_dir: str | Path
) -> dict[str, pl.DataFrame]:
    """Every table from the per-run files that exist now, and the runs table with each run's
    status (failed runs carry their reason): a partial view while runs fail or are pending."""
    results_dir = Path(results_dir)
    tables = {}
    for table, file in RUN_FILES.items():
        paths = [Path(s["run_dir"]) / file for s in specs.values()]
        present = [p for p in paths if p.exists()]
        tables[table] = collect_table(table, present, results_dir / f"{table}.parquet")
    tables["runs"] = collect_runs(specs, results_dir / "runs.parquet")
    return tables


def collect_runs(specs: Mapping[str, Mapping[str, Any]], out_path: str | Path) -> pl.DataFrame:
    frame = runs_frame(specs)
    write_table("runs", frame, out_path)
    return frame
