"""Throughput, peak memory and MFU of a variant at given sequence lengths, on random weights.

Modes: `train` (forward + backward of the LM loss), `prefill` (forward without gradients) and
`decode` (one token at a time through the cache after a prefill of `seq_len` tokens). Each
measurement runs `warmup` untimed steps, then `repeats` timed ones, and reports the median;
CUDA events time the GPU, the wall clock the CPU. MFU is the analytic FLOP count
(ltstudy.models.flops) per second over the device's peak: configured, or measured with a
large matmul. A length that does not fit in memory is recorded with status "oom".
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
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
from ltstudy.models.flops import flops_per_token
from ltstudy.models.transformer import build_model
from ltstudy.results.schemas import identity, table_frame, write_table

MODES = ("train", "prefill", "decode")


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds one call takes: CUDA events on the GPU, the wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_peak_tflops(device: torch.device, dtype: str) -> float:
    """Dense matmul throughput of this device in the run's compute dtype (a practical peak)."""
    n = 4096 if device.type == "cuda" else 1024
    kind = torch.bfloat16 if (device.type == "cuda" and dtype == "bf16") else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=kind) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    seconds = statistics.median(_timed(lambda: a @ b, device) for _ in range(10))
    return 2 * n**3 / seconds / 1e12


def _step(
    model: torch.nn.Module, tokens: torch.Tensor, mode: str, dtype: str, decode_tokens: int
) -> Callable[[], None]:
    """The timed work of one repeat (decode: prefill happens here, untimed)."""
    device = tokens.device
    if mode == "train":

        def run() -> None:
            with autocast(device, dtype):
                loss = model.token_losses(tokens[:, :-1], tokens[:, 1:]).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)

        return run
    if mode == "prefill":

        def run() -> None:
            with torch.no_grad(), autocast(device, dtype):
                model.hidden_states(tokens[:, :-1])

        return run
    cache = model.new_cache()
    with torch.no_grad(), autocast(device, dtype):
        model(tokens[:, :-1], cache)

    def run() -> None:
        step = tokens[:, -1:]
        with torch.no_grad(), autocast(device, dtype):
            for _ in range(decode_tokens):
                step = model(step, cache)[:, -1:].argmax(-1)

    return run


def measure(
    model: torch.nn.Module,
    seq_len: int,
    batch_size: int,
    mode: str,
    warmup: int,
    repeats: int,
    dtype: str,
    peak_tflops: float,
    seed: int = 0,
    decode_tokens: int = 16,
) -> dict[str, Any]:
    device = next(model.parameters()).device
    params = sum(p.numel() for p in model.parameters())
    flops = flops_per_token(model.cfg.to_dict(), params, seq_len, mode)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.vocab_size, (batch_size, seq_len + 1), generator=g).to(
        device
    )
    model.train(mode == "train")
    try:
        times = []
        reset_peak_memory(device)
        for i in range(warmup + repeats):
            run = _step(model, tokens, mode, dtype, decode_tokens)
            seconds = _timed(run, device)
            if i >= warmup:
                times.append(seconds)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return {
            "status": "oom",
            "tokens_per_s": None,
            "step_ms": None,
            "peak_memory_mb": None,
            "flops_per_token": flops,
            "achieved_tflops": None,
            "mfu": None,
        }
    median = statistics.median(times)
    produced = batch_size * (decode_tokens if mode == "decode" else seq_len)
    rate = produced / median
    achieved = rate * flops / 1e12
    return {
        "status": "ok",
        "tokens_per_s": rate,
        "step_ms": median * 1e3,
        "peak_memory_mb": peak_memory_mb(device)[0],
        "flops_per_token": flops,
        "achieved_tflops": achieved,
        "mfu": achieved / peak_tflops,
    }


def throughput_rows(
    spec: Mapping[str, Any],
    model: torch.nn.Module,
    cfg: Mapping[str, Any],
    peak_tflops: float,
    log: Callable[[str], None] = print,
) -> list[dict]:
    device = next(model.parameters()).device
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for seq_len in sorted(cfg["contexts"]):
        for mode in cfg["modes"]:
            result = measure(
                model,
                seq_len,
                cfg["batch_size"],
                mode,
                cfg["warmup"],
                cfg["repeats"],
                spec["train"]["dtype"],
                peak_tflops,
                spec["seed"],
                cfg["decode_tokens"],
            )
            rows.append(
                {
                    **identity(spec),
                    "mode": mode,
                    "seq_len": seq_len,
                    "batch_size": cfg["batch_size"],
                    **result,
                    "memory_kind": peak_memory_mb(device)[1],
                    "device": device_name(device),
                    "params": params,
                    "peak_tflops": peak_tflops,
                }
            )
            if result["status"] == "ok":
                log(
                    f"[throughput {spec['run_id']}] {mode} {seq_len:,}: "
                    f"{result['tokens_per_s']:,.0f} tok/s, MFU {100 * result['mfu']:.1f}%"
                )
            else:
                log(f"[throughput {spec['run_id']}] {mode} {seq_len:,}: out of memory")
    return rows


def evaluate_throughput(spec: Mapping[str, Any], out_path: str) -> None:
    cfg = spec["evaluate"]["throughput"]
    device = pick_device()
    configure_threads(spec["resources"]["evaluate"]["cpus_per_task"])
    model = build_model(spec["model"], seed=spec["seed"], device=device)
    peak = cfg["peak_tflops"] or measure_peak_tflops(device, spec["train"]["dtype"])
    write_table("throughput", throughput_rows(spec, model, cfg, peak), out_path)


def benchmark(specs: Sequence[Mapping[str, Any]], peak_tflops: float | None = None):
    """Throughput of several run specs in this process (the `ltstudy throughput` command)."""
    device = pick_device()
    rows = []
    for spec in specs:
        peak = peak_tflops or spec["evaluate"]["throughput"]["peak_tflops"]
        peak = peak or measure_peak_tflops(device, spec["train"]["dtype"])
        try:
            model = build_model(spec["model"], seed=spec["seed"], device=device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"[throughput {spec['run_id']}] the weights do not fit on {device}", flush=True)
            continue
        rows += throughput_rows(
            spec, model, spec["evaluate"]["throughput"], peak, lambda line: print(line, flush=True)
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return table_frame("throughput", rows)
