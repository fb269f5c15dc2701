"""The fixed schema of every results table.

Per-run files and the collected `results/<table>.parquet` share one schema per table, so a
table can be read back with `pl.read_parquet(path)` and checked with `check_schema`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import polars as pl

from ltstudy.io import atomic_path

IDENTITY = {
    "run_id": pl.String,
    "study": pl.String,
    "variant": pl.String,
    "size": pl.String,
    "context": pl.Int64,
}

TABLES: dict[str, pl.Schema] = {
    "train_curves": pl.Schema(
        {
            **IDENTITY,
            "step": pl.Int64,
            "tokens": pl.Int64,
            "loss": pl.Float64,
            "lr": pl.Float64,
            "grad_norm": pl.Float64,
            "tokens_per_s": pl.Float64,
            "elapsed_s": pl.Float64,
        }
    ),
    "perplexity": pl.Schema(
        {
            **IDENTITY,
            "protocol": pl.String,
            "length": pl.Int64,
            "rope": pl.String,
            "stride": pl.Int64,
            "block": pl.Int64,
            "window_context": pl.Int64,
            "windows": pl.Int64,
            "tokens_scored": pl.Int64,
            "nll": pl.Float64,
            "ppl": pl.Float64,
        }
    ),
    "position_loss": pl.Schema(
        {
            **IDENTITY,
            "length": pl.Int64,
            "rope": pl.String,
            "bucket_start": pl.Int64,
            "bucket_end": pl.Int64,
            "tokens": pl.Int64,
            "nll": pl.Float64,
        }
    ),
    "passkey": pl.Schema(
        {
            **IDENTITY,
            "length": pl.Int64,
            "rope": pl.String,
            "depth": pl.Float64,
            "needle_distance": pl.Int64,
            "trial": pl.Int64,
            "passkey": pl.String,
            "prediction": pl.String,
            "correct": pl.Boolean,
        }
    ),
    "ruler": pl.Schema(
        {
            **IDENTITY,
            "task": pl.String,
            "length": pl.Int64,
            "rope": pl.String,
            "sample": pl.Int64,
            "status": pl.String,
            "reason": pl.String,
            "score": pl.Float64,
            "prediction": pl.String,
            "references": pl.String,
        }
    ),
    # One row per (task, subtask, metric, filter) as lm-evaluation-harness reports it; a task
    # without local data is one row with status "skipped" and the reason.
    "lm_eval": pl.Schema(
        {
            **IDENTITY,
            "task": pl.String,
            "subtask": pl.String,
            "metric": pl.String,
            "filter": pl.String,
            "value": pl.Float64,
            "stderr": pl.Float64,
            "num_fewshot": pl.Int64,
            "samples": pl.Int64,
            "status": pl.String,
            "reason": pl.String,
        }
    ),
    "throughput": pl.Schema(
        {
            **IDENTITY,
            "mode": pl.String,
            "seq_len": pl.Int64,
            "batch_size": pl.Int64,
            "status": pl.String,
            "tokens_per_s": pl.Float64,
            # the fastest and slowest repeat: how far to trust the median
            "tokens_per_s_min": pl.Float64,
            "tokens_per_s_max": pl.Float64,
            "step_ms": pl.Float64,
            "peak_memory_mb": pl.Float64,
            "memory_kind": pl.String,
            "device": pl.String,
            "params": pl.Int64,
            "flops_per_token": pl.Float64,
            "achieved_tflops": pl.Float64,
            "peak_tflops": pl.Float64,
            "peak_source": pl.String,
            "mfu": pl.Float64,
        }
    ),
    "runs": pl.Schema(
        {
            "run_id": pl.String,
            "study": pl.String,
            "name": pl.String,
            "variant": pl.String,
            "size": pl.String,
            "context": pl.Int64,
            "seed": pl.Int64,
            "config_hash": pl.String,
            "params": pl.Int64,
            "params_non_embedding": pl.Int64,
            "status": pl.String,
            "error": pl.String,
            "train_steps": pl.Int64,
            "train_tokens": pl.Int64,
            "world_size": pl.Int64,
            "context_parallel": pl.Int64,
            "final_loss": pl.Float64,
            "wall_s": pl.Float64,
            "gpu_hours": pl.Float64,
            "attempts": pl.Int64,
            "config": pl.String,
        }
    ),
}

# Per-run file of each table, relative to the run folder.
RUN_FILES = {
    "train_curves": "train_curve.parquet",
    "perplexity": "perplexity.parquet",
    "position_loss": "position_loss.parquet",
    "passkey": "passkey.parquet",
    "ruler": "ruler.parquet",
    "lm_eval": "lm_eval.parquet",
    "throughput": "throughput.parquet",
}
# What each stage writes into the run folder, by output name.
STAGE_OUTPUTS = {
    "train": {"model": "model.safetensors", "curve": RUN_FILES["train_curves"]},
    "perplexity": {"table": RUN_FILES["perplexity"], "positions": RUN_FILES["position_loss"]},
    "passkey": {"table": RUN_FILES["passkey"]},
    "ruler": {"table": RUN_FILES["ruler"]},
    "lm_eval": {"table": RUN_FILES["lm_eval"]},
    "throughput": {"table": RUN_FILES["throughput"]},
}


def stage_outputs(run_dir: str | Path, stage: str) -> dict[str, str]:
    return {name: f"{run_dir}/{file}" for name, file in STAGE_OUTPUTS[stage].items()}


# The stage that writes each per-run table.
TABLE_STAGE = {
    "train_curves": "train",
    "perplexity": "perplexity",
    "position_loss": "perplexity",
    "passkey": "passkey",
    "ruler": "ruler",
    "lm_eval": "lm_eval",
    "throughput": "throughput",
}


def identity(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: spec[k] for k in IDENTITY}


def table_frame(table: str, rows: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=TABLES[table], strict=False)


def write_table(
    table: str, frame: pl.DataFrame | Iterable[Mapping[str, Any]], path: str | Path
) -> None:
    if not isinstance(frame, pl.DataFrame):
        frame = table_frame(table, frame)
    check_schema(table, frame.schema, where=str(path))
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)


def check_schema(table: str, schema: pl.Schema, where: str = "") -> None:
    expected = TABLES[table]
    if schema != expected:
        raise ValueError(
            f"{where or table}: schema {dict(schema)} differs from {table}'s {dict(expected)}"
        )
