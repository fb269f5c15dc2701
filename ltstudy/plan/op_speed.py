"""Each op's fast path against its torch reference: the `ltstudy ops` benchmark.

For every op, inputs shaped as one layer of a size preset at a context (batch 1), timed forward
and backward (`train`) and forward alone (`prefill`) under `model.kernels: reference` and
`triton`; the ratio is reference time / fast time. The fast path is our own Triton kernel
(In-Place TTT, LaCT), flash-linear-attention's (GLA, Mamba2's SSD, gated DeltaNet; "library")
or FlexAttention (sliding window). On the CPU the fast paths do not run (they need a GPU), so
the table has the reference alone. Needs torch only.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ltstudy.ops import backend

Op = Callable[[str], Sequence[Tensor]]  # kernels setting -> outputs


def _random(shape: Sequence[int], device: torch.device, dtype: torch.dtype, g) -> Tensor:
    return torch.randn(*shape, generator=g, device=device).to(dtype).requires_grad_()


def op_cases(model: Mapping[str, Any], context: int, device, dtype) -> dict[str, tuple[str, Op]]:
    """(fast path's name, op) for each op of a model config (its variant's mixer)."""
    from ltstudy.ops.attention import attention
    from ltstudy.ops.delta_rule import gated_delta_rule
    from ltstudy.ops.gla import gla, min_log_decay
    from ltstudy.ops.lact import lact
    from ltstudy.ops.ttt import inplace_ttt

    g = torch.Generator(device=device).manual_seed(0)
    T, m, variant = context, model["mixer"], model["variant"]

    def rand(*shape: int) -> Tensor:
        return _random(shape, device, dtype, g)

    def log_decay(*shape: int, floor: float = -20.0) -> Tensor:
        return F.logsigmoid(rand(*shape).detach() + 4).clamp_min(floor).requires_grad_()

    if variant == "swa":
        H, Hkv, D = model["n_heads"], model["n_kv_heads"], model["head_dim"]
        q, k, v = rand(1, H, T, D), rand(1, Hkv, T, D), rand(1, Hkv, T, D)
        return {"swa": ("flex", lambda kernels: [attention(q, k, v, model["swa_window"], kernels)])}
    if variant == "gla":
        H, K, V, C = m["n_heads"], m["key_dim"], m["value_dim"], m["chunk_size"]
        q, k, v = rand(1, H, T, K), rand(1, H, T, K), rand(1, H, T, V)
        gk = log_decay(1, H, T, K, floor=min_log_decay(C))
        return {"gla": ("fla", lambda kernels: gla(q, k, v, gk, K**-0.5, None, C, None, kernels))}
    if variant == "mamba2":
        H, P, N, C = m["n_heads"], m["head_dim"], m["d_state"], m["chunk_size"]
        q, k, v, gh = rand(1, H, T, N), rand(1, H, T, N), rand(1, H, T, P), log_decay(1, H, T)
        return {"ssd": ("fla", lambda kernels: gla(q, k, v, gh, 1.0, None, C, None, kernels))}
    if variant == "deltanet":
        H, D, C = m["n_heads"], m["head_dim"], m["chunk_size"]
        q, v, gh = rand(1, H, T, D), rand(1, H, T, D), log_decay(1, H, T)
        k = F.normalize(rand(1, H, T, D).detach(), dim=-1).requires_grad_()
        beta = torch.sigmoid(rand(1, H, T).detach()).requires_grad_()

        def delta_rule(kernels: str) -> Sequence[Tensor]:
            return gated_delta_rule(q, k, v, gh, beta, D**-0.5, None, C, None, kernels)

        return {"gated delta rule": ("fla", delta_rule)}
    if variant == "lact":
        H, D, C = model["n_heads"], model["head_dim"], m["chunk_size"]
        hidden = m["hidden_ratio"] * D
        q, k, v = rand(1, H, T, D), rand(1, H, T, D), rand(1, H, T, D)
        lr = (torch.rand(1, H, T, 3, generator=g, device=device) * 1e-3).to(dtype)
        momentum = torch.rand(1, H, T, generator=g, device=device).to(dtype)
        weights = (rand(H, hidden, D), rand(H, D, hidden), rand(H, hidden, D))

        def fast_weights(kernels: str) -> Sequence[Tensor]:
            out, _ = lact(q, k, v, lr, weights, C, None, momentum, m["use_muon"], kernels)
            return [out]

        return {"lact": ("triton", fast_weights)}
    if model.get("ttt"):
        D, Fd = model["d_model"], model["d_ff"]
        z, v, w = rand(1, T, Fd), rand(1, T, D), rand(D, Fd)
        settings = {"eta": model["ttt"]["eta"], "chunk_size": model["ttt"]["chunk_size"]}
        return {
            "in-place ttt": (
                "triton",
                lambda kernels: inplace_ttt(z, v, w, **settings, kernels=kernels),
            )
        }
    return {}


def time_op(op: Op, kernels: str, mode: str, device: torch.device, repeats: int) -> float:
    """Median seconds of one call (forward; in train also the backward of the outputs' sum)."""

    def run() -> None:
        with torch.set_grad_enabled(mode == "train"):
            outputs = [o for o in op(kernels) if o.requires_grad or mode != "train"]
            if mode == "train":
                torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])

    from ltstudy.evaluate.throughput import timed

    run()  # the first call compiles and autotunes: untimed
    return statistics.median(timed(run, device) for _ in range(repeats))


def op_rows(
    model: Mapping[str, Any],
    size: str,
    contexts: Sequence[int],
    modes: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
    repeats: int = 3,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One row per (op, context, mode) of a model config (its variant at `size`): reference and
    fast milliseconds and their ratio."""
    rows = []
    for context in contexts:
        for op_name, (fast_name, op) in op_cases(model, context, device, dtype).items():
            for mode in modes:
                row = {
                    "op": op_name,
                    "variant": model["variant"],
                    "size": size,
                    "context": context,
                    "mode": mode,
                    "fast_path": fast_name,
                    "device": device.type,
                    "dtype": str(dtype).removeprefix("torch."),
                }
                row["reference_ms"] = 1e3 * time_op(op, "reference", mode, device, repeats)
                row["fast_ms"] = row["ratio"] = None
                if device.type == "cuda":
                    try:
                        row["fast_ms"] = 1e3 * time_op(op, "triton", mode, device, repeats)
                        row["ratio"] = row["reference_ms"] / row["fast_ms"]
                    except (RuntimeError, ImportError) as err:  # a library missing
                        row["fast_path"] += f" (failed: {str(err).splitlines()[0][:80]})"
                rows.append(row)
                log(format_row(row))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


HEADER = (
    f"{'op':<17} {'variant':<9} {'size':<6} {'context':>8} {'mode':<8} {'reference ms':>12} "
    f"{'fast ms':>9} {'ref/fast':>8}  fast path"
)


def format_row(row: Mapping[str, Any]) -> str:
    fast = f"{row['fast_ms']:>9.2f}" if row["fast_ms"] is not None else f"{'-':>9}"
    ratio = f"{row['ratio']:>8.2f}" if row["ratio"] is not None else f"{'-':>8}"
    return (
        f"{row['op']:<17} {row['variant']:<9} {row['size']:<6} {row['context']:>8} "
        f"{row['mode']:<8} {row['reference_ms']:>12.2f} {fast} {ratio}  {row['fast_path']}"
    )


def fast_paths_available(device: torch.device) -> str | None:
    """Why the fast paths cannot be measured here (None when they can)."""
    if device.type != "cuda":
        return "no CUDA GPU: the fast paths (Triton, FlexAttention, fla) are not measured"
    if not backend.has_module("triton"):
        return "triton is not installed: the fast paths are not measured"
    return None
