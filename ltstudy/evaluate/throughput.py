"""Throughput and peak memory of a variant at given sequence lengths, on random weights.

Modes: `train` (forward + backward of the LM loss) and `prefill` (forward without gradients).
Each measurement runs `warmup` untimed steps, then `repeats` timed ones; the median is
reported. A length that does not fit in memory is recorded with status "oom".
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch

from ltstudy.device import (
    autocast,
    configure_threads,
    device_name,
    peak_memory_mb,
    pick_device,
    reset_peak_memory,
    synchronize,
)
from ltstudy.models.transformer import build_model
from ltstudy.results.schemas import identity, write_table


def _step(model: torch.nn.Module, tokens: torch.Tensor, mode: str, dtype: str) -> None:
    device = tokens.device
    if mode == "train":
        with autocast(device, dtype):
            loss = model.token_losses(tokens[:, :-1], tokens[:, 1:]).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad(), autocast(device, dtype):
            model.hidden_states(tokens[:, :-1])


def measure(
    model: torch.nn.Module,
    seq_len: int,
    batch_size: int,
    mode: str,
    warmup: int,
    repeats: int,
    dtype: str,
    seed: int = 0,
) -> dict[str, Any]:
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.vocab_size, (batch_size, seq_len + 1), generator=g).to(
        device
    )
    try:
        for _ in range(warmup):
            _step(model, tokens, mode, dtype)
        synchronize(device)
        reset_peak_memory(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _step(model, tokens, mode, dtype)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return {"status": "oom", "tokens_per_s": None, "step_ms": None, "peak_memory_mb": None}
    median = statistics.median(times)
    memory, _ = peak_memory_mb(device)
    return {
        "status": "ok",
        "tokens_per_s": batch_size * seq_len / median,
        "step_ms": median * 1e3,
        "peak_memory_mb": memory,
    }


def evaluate_throughput(spec: Mapping[str, Any], out_path: str) -> None:
    cfg = spec["evaluate"]["throughput"]
    device = pick_device()
    configure_threads(spec["resources"]["evaluate"]["cpus_per_task"])
    model = build_model(spec["model"], seed=spec["seed"], device=device)
    params = sum(p.numel() for p in model.parameters())
    _, memory_kind = peak_memory_mb(device)
    rows = []
    for seq_len in sorted(cfg["contexts"]):
        for mode in cfg["modes"]:
            model.train(mode == "train")
            result = measure(
                model,
                seq_len,
                cfg["batch_size"],
                mode,
                cfg["warmup"],
                cfg["repeats"],
                spec["train"]["dtype"],
                spec["seed"],
            )
            rows.append(
                {
                    **identity(spec),
                    "mode": mode,
                    "seq_len": seq_len,
                    "batch_size": cfg["batch_size"],
                    **result,
                    "memory_kind": memory_kind,
                    "device": device_name(device),
                    "params": params,
                }
            )
            rate = (
                f"{result['tokens_per_s']:,.0f} tok/s"
                if result["status"] == "ok"
                else "out of memory"
            )
            print(f"[throughput {spec['run_id']}] {mode} {seq_len:,}: {rate}", flush=True)
    write_table("throughput", rows, out_path)
