"""Context-parallel communication per variant: bytes each rank sends per layer per training
step (forward + backward) with its sequences split over K ranks, against the all-gather-KV
baseline (what full attention sends: every span's keys and values to every rank), and the
step time at context degree 1 and K.

Every variant runs real training steps of the whole model on K fresh processes that form one
process group (gloo on the CPU, NCCL on GPUs, one per rank; only torch, numpy and pyarrow are
needed, so it runs on a GPU machine without the workflow's other packages); the bytes are
counted by the exchanges themselves (`ltstudy.parallel.context.Traffic`: the algorithmic
volume, what a ring all-gather or reduce-scatter sends; gloo's all-reduce stand-in for the
reduce-scatter moves more). The table goes to results/benchmarks/comm-<device>.{md,parquet}.

    python scripts/comm_benchmark.py                  # demo width, 4K and 16K tokens, K = 2
    python scripts/comm_benchmark.py --size 500M --contexts 32768 --degree 8   # 8 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WHAT_CROSSES = {
    "full": "every span's keys and values (all-gather)",
    "swa": "window - 1 keys and values (halo)",
    "hybrid": "halo on window layers, all-gather on full ones",
    "gla": "state summary: decay [K] + state [K, V] per head",
    "deltanet": "state summary: transition [K, K] + state [K, V] per head; conv halo",
    "mamba2": "state summary: decay + state [N, P] per head; conv halo",
    "lact": "fast weights rank to rank (in order); window halo",
    "ttt_full": "sum of the span's fast-weight writes [D, F]; all-gather KV",
    "ttt_swa": "sum of the span's fast-weight writes [D, F]; window halo",
}


def measure(variants: list[str], size: str, context: int, degree: int, repeats: int) -> list:
    """On every rank of this job: one warm-up and `repeats` timed steps per variant."""
    import torch

    from ltstudy.config import default_settings
    from ltstudy.device import synchronize
    from ltstudy.models.presets import resolve_model
    from ltstudy.models.transformer import build_model
    from ltstudy.parallel.context import context_group
    from ltstudy.parallel.distributed import joined_world
    from ltstudy.parallel.spans import span_multiple

    rows = []
    with joined_world() as world:
        group = context_group(world.device.type, world.size, degree) if degree > 1 else None
        for variant in variants:
            cfg = resolve_model(variant, size, default_settings()["model"], context=context)
            model = build_model(cfg, seed=0, device=world.device)
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, cfg["vocab_size"], (1, context + 1), generator=g)
            ids = ids.to(world.device)
            times, sent = [], {}
            for repeat in range(repeats + 1):
                split = None if group is None else group.split(context, span_multiple(cfg))
                start, length = (0, context) if split is None else (split.offset, split.length)
                piece = ids[:, start : start + length + 1]
                synchronize(world.device)
                t0 = time.perf_counter()
                losses = model.token_losses(piece[:, :-1], piece[:, 1:], context=split)
                losses.sum().backward()
                synchronize(world.device)
                if repeat:
                    times.append(time.perf_counter() - t0)
                    sent = {} if split is None else dict(split.traffic.sent)
                model.zero_grad(set_to_none=True)
            per_layer = sum(sent.values()) / cfg["n_layers"]
            rows.append(
                {
                    "variant": variant,
                    "rank": world.rank,
                    "bytes_per_layer": per_layer,
                    "kinds": ", ".join(sorted(sent)),
                    "step_s": statistics.median(times),
                }
            )
            world.barrier()
    return rows


def run_job(variants, size, context, degree, repeats) -> list[dict[str, Any]]:
    """`measure` on `degree` fresh processes that form one process group (the variables
    torchrun sets), so it needs nothing beyond torch: every rank's rows."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    payload = json.dumps([variants, size, context, degree, repeats])
    procs = []
    for rank in range(degree):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1"}
        env.update(MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank))
        env.update(WORLD_SIZE=str(degree), LOCAL_WORLD_SIZE=str(degree))
        if degree == 1:
            env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE")}
        command = [sys.executable, __file__, "--rank-job", payload]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    rows = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a rank of the degree-{degree} job failed (exit {proc.returncode})")
        rows += json.loads(out.strip().splitlines()[-1])
    return rows


def main(argv: list[str] | None = None) -> None:
    from ltstudy.models.variants import VARIANTS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="demo")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rank-job", help=argparse.SUPPRESS)  # one rank of run_job
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks")
    args = parser.parse_args(argv)
    if args.rank_job:
        print(json.dumps(measure(*json.loads(args.rank_job))), flush=True)
        return
    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    table = []
    for context in args.contexts:
        print(f"context degree 1 and {args.degree}, {args.size} at {context:,} tokens ...")
        one = run_job(args.variants, args.size, context, 1, args.repeats)
        many = run_job(args.variants, args.size, context, args.degree, args.repeats)
        table += rows_for(args, context, one, many)
    note = (
        f"Bytes one rank sends per layer per training step (forward + backward, the busiest "
        f"rank), {args.size} width, sequences split over {args.degree} ranks ({args.device}); "
        "`vs_all_gather_kv` divides by what full attention's all-gather of keys and values "
        "sends at the same length: the state summaries do not grow with the sequence, the "
        "keys and values do. Step times: the slowest rank's forward + backward (on the CPU the "
        "ranks share this machine's cores, so they show the work, not a speed-up)."
    )
    write_tables(table, args.out / f"comm-{args.device}", note)


def rows_for(args, context: int, single: list, split: list) -> list[dict[str, Any]]:
    baseline = max(r["bytes_per_layer"] for r in split if r["variant"] == "full")
    rows = []
    for variant in args.variants:
        ranks = [r for r in split if r["variant"] == variant]
        sent = max(r["bytes_per_layer"] for r in ranks)  # the busiest rank
        rows.append(
            {
                "context": context,
                "variant": variant,
                "what_crosses": WHAT_CROSSES.get(variant, ""),
                "mb_per_layer_step": round(sent / 1e6, 4),
                "vs_all_gather_kv": round(sent / baseline, 4) if baseline else None,
                "step_s_cp1": round(
                    next(r["step_s"] for r in single if r["variant"] == variant), 3
                ),
                f"step_s_cp{args.degree}": round(max(r["step_s"] for r in ranks), 3),
                "device": args.device,
                "size": args.size,
                "degree": args.degree,
            }
        )
    return rows


def write_tables(rows: list[dict[str, Any]], stem: Path, note: str) -> None:
    """stem.parquet and stem.md (a markdown table under a note), printed too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), stem.with_suffix(".parquet"))
    columns = [c for c in rows[0] if c not in ("device", "size", "degree")]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    stem.with_suffix(".md").write_text(f"# Context-parallel communication\n\n{note}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
