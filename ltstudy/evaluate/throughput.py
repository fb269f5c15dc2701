"""Throughput, peak memory and MFU of a variant at given sequence lengths, on random weights.

Modes: `train` (forward + backward of the LM loss), `prefill` (forward without gradients, up to
the final hidden states) and `decode` (one token at a time through the cache after a prefill of
`seq_len` tokens). Each measurement runs `warmup` untimed steps, then `repeats` timed ones, and
reports the median beside the slowest and fastest repeat; CUDA events time the GPU, the wall
clock the CPU. MFU is the FLOP count of ltstudy.models.flops (PaLM/torchtitan's
6·N + 12·L·H·Q·T for training) per second over the device's peak: given (`peak_tflops`), else
the datasheet's dense bf16 peak of a known GPU, else a measured matmul (the CPU, an unknown GPU,
fp32 compute); `peak_source` says which.

Peak memory is per point: on CUDA the allocator's peak since the point began; on the CPU each
point runs in a fresh process forked from a server (the resident set's peak is a lifetime
maximum). A length that
does not fit in memory is recorded with status "oom".
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

import torch

from ltstudy import progress
from ltstudy.device import (
    autocast,
    configure_threads,
    datasheet_peak_tflops,
    device_name,
    peak_memory_mb,
    pick_device,
    reset_peak_memory,
    synchronize,
)
from ltstudy.models.attention import reserve_kv_cache
from ltstudy.models.flops import flops_per_token
from ltstudy.models.transformer import build_model, count_parameters

MODES = ("train", "prefill", "decode")
# results.schemas.IDENTITY's columns (that module needs polars, which GPU machines may lack)
IDENTITY = ("run_id", "study", "variant", "size", "context")


def timed(fn: Callable[[], None], device: torch.device) -> float:
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
    seconds = statistics.median(timed(lambda: a @ b, device) for _ in range(10))
    return 2 * n**3 / seconds / 1e12


def device_peak(device: torch.device, dtype: str, given: float | None = None) -> tuple[float, str]:
    """(TFLOP/s, source) that MFU divides by: given, the datasheet's (a known GPU computing in
    bf16), or measured."""
    if given:
        return given, "given"
    if device.type == "cuda" and dtype == "bf16":
        peak = datasheet_peak_tflops(torch.cuda.get_device_name(device))
        if peak:
            return peak, "datasheet"
    return measure_peak_tflops(device, dtype), "measured"


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
    reserve_kv_cache(cache, tokens.shape[1] - 1 + decode_tokens)
    with torch.no_grad(), autocast(device, dtype):
        model.logits_at(tokens[:, :-1], -1, cache)

    def run() -> None:
        step = tokens[:, -1:]
        with torch.no_grad(), autocast(device, dtype):
            for _ in range(decode_tokens):
                step = model.logits_at(step, -1, cache).argmax(-1)

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
    """One point in this process: the peak memory is this process's since the point began on
    CUDA, but its lifetime peak on the CPU (so run CPU points with `measure_fresh`)."""
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
            seconds = timed(run, device)
            if i >= warmup:
                times.append(seconds)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return _oom(flops, params, peak_memory_mb(device)[1])
    median = statistics.median(times)
    produced = batch_size * (decode_tokens if mode == "decode" else seq_len)
    rate = produced / median
    achieved = rate * flops / 1e12
    memory, kind = peak_memory_mb(device)
    return {
        "status": "ok",
        "tokens_per_s": rate,
        "tokens_per_s_min": produced / max(times),
        "tokens_per_s_max": produced / min(times),
        "step_ms": median * 1e3,
        "peak_memory_mb": memory,
        "memory_kind": kind,
        "params": params,
        "flops_per_token": flops,
        "achieved_tflops": achieved,
        "mfu": achieved / peak_tflops,
    }


def _oom(flops: float, params: int, memory_kind: str) -> dict[str, Any]:
    return {
        "status": "oom",
        "tokens_per_s": None,
        "tokens_per_s_min": None,
        "tokens_per_s_max": None,
        "step_ms": None,
        "peak_memory_mb": None,
        "memory_kind": memory_kind,
        "params": params,
        "flops_per_token": flops,
        "achieved_tflops": None,
        "mfu": None,
    }


def measure_point(point: Mapping[str, Any]) -> dict[str, Any]:
    """A CPU point in this process: the body of `measure_fresh`'s child."""
    torch.set_num_threads(point["threads"])
    model = build_model(point["model"], seed=point["seed"], device="cpu")
    return measure(model, **{k: v for k, v in point.items() if k not in ("model", "threads")})


def _measure_child(point: Mapping[str, Any], conn: Connection) -> None:
    try:
        conn.send(("ok", measure_point(point)))
    except RuntimeError as err:  # the CPU allocator: "DefaultCPUAllocator: can't allocate ..."
        reason = str(err).splitlines()[0]
        conn.send(("oom" if "allocate" in reason else f"failed: {reason}", None))


def measure_fresh(model_cfg: Mapping[str, Any], **args: Any) -> dict[str, Any]:
    """`measure` on the CPU in a fresh process (with this process's threads), so that the
    resident set's peak is this point's alone. The process is forked from a server that has
    imported torch and this module: a new interpreter's baseline without paying its start-up
    (seconds) at every point."""
    point = {"model": dict(model_cfg), "threads": torch.get_num_threads(), **args}
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # takes effect when the server first starts
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_measure_child, args=(point, send))
    child.start()
    send.close()
    try:
        status, result = receive.recv()
    except EOFError:  # killed: the kernel's out-of-memory killer sends SIGKILL
        child.join()
        status, result = ("oom" if child.exitcode == -9 else f"exit code {child.exitcode}"), None
    child.join()
    if status == "oom":
        params = count_parameters(model_cfg)["total"]
        flops = flops_per_token(model_cfg, params, args["seq_len"], args["mode"])
        return _oom(flops, params, "cpu_peak_rss")
    if result is None:
        raise RuntimeError(f"throughput point {args['mode']} {args['seq_len']}: {status}")
    return result


def throughput_rows(
    spec: Mapping[str, Any],
    model: torch.nn.Module | None,
    cfg: Mapping[str, Any],
    peak: tuple[float, str],
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Every context x mode: with `model` in this process (a GPU), without it each point in a
    fresh process on the CPU. `peak` is (TFLOP/s, source), from `device_peak`."""
    device = torch.device("cpu") if model is None else next(model.parameters()).device
    rows, points = [], len(cfg["contexts"]) * len(cfg["modes"])
    progress.update(0, points, "points")
    for seq_len in sorted(cfg["contexts"]):
        for mode in cfg["modes"]:
            args = {
                "seq_len": seq_len,
                "batch_size": cfg["batch_size"],
                "mode": mode,
                "warmup": cfg["warmup"],
                "repeats": cfg["repeats"],
                "dtype": spec["train"]["dtype"],
                "peak_tflops": peak[0],
                "seed": spec["seed"],
                "decode_tokens": cfg["decode_tokens"],
            }
            if model is None:
                result = measure_fresh(spec["model"], **args)
            else:
                result = measure(model, **args)
            rows.append(
                {
                    **{key: spec[key] for key in IDENTITY},
                    "mode": mode,
                    "seq_len": seq_len,
                    "batch_size": cfg["batch_size"],
                    **result,
                    "device": device_name(device),
                    "peak_tflops": peak[0],
                    "peak_source": peak[1],
                }
            )
            progress.update(len(rows), points, "points")
            if result["status"] == "ok":
                log(
                    f"[throughput {spec['run_id']}] {mode} {seq_len:,}: "
                    f"{result['tokens_per_s']:,.0f} tok/s, {result['peak_memory_mb']:,.0f} MB, "
                    f"MFU {100 * result['mfu']:.1f}% of {peak[0]:.4g} TFLOP/s ({peak[1]})"
                )
            else:
                log(f"[throughput {spec['run_id']}] {mode} {seq_len:,}: out of memory")
    return rows


def evaluate_throughput(spec: Mapping[str, Any], out_path: str) -> None:
    from ltstudy.results.schemas import write_table

    cfg = spec["evaluate"]["throughput"]
    device = pick_device()
    configure_threads(spec["resources"]["evaluate"]["cpus_per_task"])
    peak = device_peak(device, spec["train"]["dtype"], cfg["peak_tflops"])
    model = None
    if device.type == "cuda":
        model = build_model(spec["model"], seed=spec["seed"], device=device)
    write_table("throughput", throughput_rows(spec, model, cfg, peak), out_path)


def benchmark(
    specs: Sequence[Mapping[str, Any]], peak_tflops: float | None = None
) -> list[dict[str, Any]]:
    """Throughput rows of several run specs (the `ltstudy throughput` command): on a GPU in
    this process, on the CPU each point in a fresh one. Needs no polars (GPU machines may
    lack it)."""
    device = pick_device()
    rows = []
    for spec in specs:
        given = peak_tflops or spec["evaluate"]["throughput"]["peak_tflops"]
        peak = device_peak(device, spec["train"]["dtype"], given)
        model = None
        if device.type == "cuda":
            try:
                model = build_model(spec["model"], seed=spec["seed"], device=device)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(
                    f"[throughput {spec['run_id']}] the weights do not fit on {device}", flush=True
                )
                continue
        rows += throughput_rows(
            spec, model, spec["evaluate"]["throughput"], peak, lambda line: print(line, flush=True)
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
