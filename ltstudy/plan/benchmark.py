"""Measured peak memory next to the planner's estimate: `ltstudy memory`.

Each point (variant, size, context, mode) runs in a fresh process so that one point's memory
does not hide another's: on the CPU the peak resident set of that process, on CUDA
torch.cuda.max_memory_allocated. `train` is one optimizer step of the training code (FSDP2 on
a one-rank group on a GPU, activation checkpointing as asked); `prefill` is evaluation's
forward pass without gradients (per-token losses, the plain model). A train point with
`context_parallel` K runs on K processes (gloo on the CPU) that split its sequence, and records
the busiest rank's peak. The table goes to
results/benchmarks/memory-<device>.{parquet,md}. Only torch, numpy and pyarrow are needed, so
it runs on a GPU machine without the workflow's other packages.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

COLUMNS = {
    "variant": "string",
    "size": "string",
    "context": "int64",
    "mode": "string",
    "activation_checkpointing": "string",
    "context_parallel": "int64",
    "device": "string",
    "status": "string",
    "measured_gb": "float64",
    "estimated_gb": "float64",
    "ratio": "float64",
    "baseline_gb": "float64",
    "tokens_per_s": "float64",
    "params": "int64",
}


def _rss_bytes() -> float:
    from ltstudy.device import resident_peak_mb

    return resident_peak_mb() * 2**20


def measure_point(point: Mapping[str, Any]) -> dict[str, Any]:
    """Run one point in this process and return what it used (call in a fresh process)."""
    import torch

    from ltstudy.config import default_settings
    from ltstudy.data.dataset import Batch
    from ltstudy.device import autocast, synchronize
    from ltstudy.models.presets import resolve_model
    from ltstudy.models.transformer import build_model, seeded_values
    from ltstudy.parallel.context import context_group
    from ltstudy.parallel.distributed import joined_world
    from ltstudy.parallel.materialize import materialize
    from ltstudy.parallel.parallelize import Layout, parallelize
    from ltstudy.parallel.spans import span_multiple
    from ltstudy.train import Share, clip_gradients, forward_backward, make_optimizer

    baseline = _rss_bytes()
    settings = default_settings()
    model_cfg = resolve_model(
        point["variant"], point["size"], settings["model"], context=point["context"]
    )
    cuda = torch.cuda.is_available()
    dtype = "bf16" if cuda else "fp32"
    ids = torch.randint(0, model_cfg["vocab_size"], (1, point["context"] + 1))
    with joined_world() as world:
        device = world.device
        ids = ids.to(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        if point["mode"] == "prefill":
            model = build_model(model_cfg, seed=None, device="meta")
            if cuda:
                model = model.to(torch.bfloat16)
            materialize(model, device, seeded_values(model.cfg, 0))
            model.eval()

            def run() -> None:
                with torch.no_grad(), autocast(device, dtype):
                    model.token_losses(ids[:, :-1], ids[:, 1:])

        else:
            layout = Layout(point["activation_checkpointing"], False, dtype)
            model = parallelize(build_model(model_cfg, seed=None, device="meta"), layout, world)
            materialize(model, device, seeded_values(model.cfg, 0))
            spec = {
                "train": {**settings["train"], "dtype": dtype},
                "model": model_cfg,
            }
            optimizer = make_optimizer(model, spec["train"])
            flags = torch.zeros_like(ids, dtype=torch.bool)
            degree = point.get("context_parallel", 1)
            group = context_group(device.type, world.size, degree) if degree > 1 else None
            share = Share(slice(0, 1), 1, world.size, group, span_multiple(model_cfg))
            counts = (float(point["context"]), 0.0)

            def run() -> None:
                forward_backward(model, Batch(ids, flags, flags), share, spec, counts)
                clip_gradients(model, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        run()  # the first step also allocates the optimizer's state
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) if cuda else _rss_bytes()
        params = sum(p.numel() for p in model.parameters())
    return {
        "measured_bytes": float(peak),
        "baseline_bytes": 0.0 if cuda else baseline,
        "tokens_per_s": point["context"] / seconds,
        "params": params,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
    }


def estimate_point(point: Mapping[str, Any], device: str) -> float:
    """The planner's estimate of what the measurement sees (bytes)."""
    from ltstudy.config import default_settings
    from ltstudy.models.presets import resolve_model
    from ltstudy.plan.memory import Shape, longest_span, prefill_memory, training_memory

    model_cfg = resolve_model(
        point["variant"], point["size"], default_settings()["model"], context=point["context"]
    )
    dtype = "bf16" if device == "cuda" else "fp32"
    if point["mode"] == "prefill":
        estimate = prefill_memory(model_cfg, device, dtype, point["context"])
    else:
        degree = point.get("context_parallel") or 1
        span = longest_span(point["context"], degree, model_cfg)
        shard = degree if degree > 1 or device == "cuda" else 1
        shape = Shape(device, dtype, degree, shard, span, 1, degree, point["context"])
        estimate = training_memory(model_cfg, shape, point["activation_checkpointing"])
    return estimate.tensors if device == "cuda" else estimate.total


def run_fresh(
    module: str, payload: Mapping[str, Any], timeout_s: float | None = None, ranks: int = 1
) -> tuple[str, dict[str, Any] | None]:
    """Run `python -m <module> '<payload as JSON>'` in a fresh process (`ranks` processes that
    form one process group, as torchrun starts them), so that its peak memory is its own:
    ("ok", the last JSON line it printed; of several ranks, the one with the highest peak), or
    ("oom" | "failed: <last error line>" | "timeout", None)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    envs = [env]
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        group = {"WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks)}
        group.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        envs = [{**env, **group, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(ranks)]
    command = [sys.executable, "-m", module, json.dumps(payload)]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
        for e in envs
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append((proc, *proc.communicate(timeout=timeout_s)))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        return "timeout", None
    results = []
    for proc, stdout, stderr in outputs:
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            reason = (stderr.strip().splitlines() or ["failed"])[-1]
            return ("oom" if "out of memory" in reason.lower() else f"failed: {reason}"), None
        results.append(json.loads(lines[-1]))
    if len(results) == 1:
        return "ok", results[0]
    return "ok", max(results, key=lambda r: r["measured_bytes"])


def run_points(
    points: Sequence[Mapping[str, Any]],
    timeout_s: int = 900,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Each point in a fresh `python -m ltstudy.plan.benchmark` process; print each row as it
    comes and hand the rows so far to `on_row` (so an interrupted run keeps its table)."""
    rows: list[dict[str, Any]] = []
    for point in points:
        degree = point.get("context_parallel", 1)
        label = (
            f"{point['variant']:<9} {point['size']:<5} {point['context']:>8} {point['mode']:<8} "
            f"{point['activation_checkpointing']:<9} {degree:>2}"
        )
        status, result = run_fresh("ltstudy.plan.benchmark", point, timeout_s, degree)
        device = "cuda" if result and result["device"] != "cpu" else "cpu"
        if result is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        estimated = estimate_point(point, device)
        measured = result["measured_bytes"] if result else None
        row = {
            **{k: point[k] for k in ("variant", "size", "context", "mode")},
            "activation_checkpointing": point["activation_checkpointing"],
            "context_parallel": degree,
            "device": result["device"] if result else device,
            "status": status,
            "measured_gb": measured / 1e9 if measured else None,
            "estimated_gb": estimated / 1e9,
            "ratio": estimated / measured if measured else None,
            "baseline_gb": result["baseline_bytes"] / 1e9 if result else None,
            "tokens_per_s": result["tokens_per_s"] if result else None,
            "params": result["params"] if result else None,
        }
        rows.append(row)
        shown = f"{row['measured_gb']:8.3f}" if measured else f"{status:>8}"
        speed = f"{row['tokens_per_s']:>10,.0f}" if result else f"{'-':>10}"
        ratio = f"{row['ratio']:6.2f}" if measured else f"{'-':>6}"
        print(f"{label} {shown} {row['estimated_gb']:9.3f} {ratio} {speed}", flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


def reestimate(path: Path) -> list[dict[str, Any]]:
    """The rows of a written table with the planner's estimate computed again."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    for row in rows:
        row["context_parallel"] = row.get("context_parallel") or 1
        device = "cpu" if row["device"] == "cpu" else "cuda"
        row["estimated_gb"] = estimate_point(row, device) / 1e9
        measured = row["measured_gb"]
        row["ratio"] = row["estimated_gb"] / measured if measured else None
    return rows


POINT_KEY = ("variant", "size", "context", "mode", "activation_checkpointing", "context_parallel")


def earlier_rows(path: Path, points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows of an existing table that the new points do not measure again (so adding
    points to a table keeps the others)."""
    import pyarrow.parquet as pq

    if not path.exists():
        return []
    again = {
        tuple(p.get(k) or 1 if k == "context_parallel" else p[k] for k in POINT_KEY) for p in points
    }
    rows = []
    for row in pq.read_table(path).to_pylist():
        row["context_parallel"] = row.get("context_parallel") or 1
        if tuple(row[k] for k in POINT_KEY) not in again:
            rows.append(row)
    return rows


HEADER = (
    f"{'variant':<9} {'size':<5} {'context':>8} {'mode':<8} {'ckpt':<9} {'cp':>2} {'measured':>8} "
    f"{'estimated':>9} {'est/me':>6} {'tokens/s':>10}"
)


def write_table(rows: Sequence[Mapping[str, Any]], out: Path, title: str) -> None:
    """results/benchmarks/memory-<device>.{parquet,md} (pyarrow: no polars needed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ltstudy.io import atomic_path

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS.items()])
    table = pa.Table.from_pylist([dict(r) for r in rows], schema=schema)
    with atomic_path(out.with_suffix(".parquet")) as tmp:
        pq.write_table(table, tmp)
    ratios = [r["ratio"] for r in rows if r["ratio"]]
    lines = [
        f"# {title}",
        "",
        "Memory in GB; est/me = the planner's estimate over the measurement.",
        "",
    ]
    lines += ["```", HEADER]
    for r in rows:
        measured = f"{r['measured_gb']:8.3f}" if r["measured_gb"] else f"{r['status']:>8}"
        ratio = f"{r['ratio']:6.2f}" if r["ratio"] else f"{'-':>6}"
        speed = f"{r['tokens_per_s']:>10,.0f}" if r["tokens_per_s"] else f"{'-':>10}"
        lines.append(
            f"{r['variant']:<9} {r['size']:<5} {r['context']:>8} {r['mode']:<8} "
            f"{r['activation_checkpointing']:<9} {r['context_parallel'] or 1:>2} {measured} "
            f"{r['estimated_gb']:9.3f} {ratio} "
            f"{speed}"
        )
    lines.append("```")
    if ratios:
        lines += [
            "",
            f"est/me from {min(ratios):.2f} to {max(ratios):.2f} over {len(ratios)} points.",
        ]
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    print(json.dumps(measure_point(json.loads(sys.argv[1]))), flush=True)
