"""Peak memory of a generation prefill and the decode steps after it (issue 14).

A passkey or RULER prompt is prefilled through the decode cache and decoded from its last
token. `all-logits` prefills with the model's forward (logits [1, N, vocab], the path before
issue 14), `last-logits` with `logits_at` (the last position's logits only), and `decode`
prefills that way and then decodes `--new-tokens` tokens, counting the bytes of the new
tensors each step creates: a key/value cache concatenated per token creates the whole cache
again every step, a preallocated one nothing of its size. Each point runs in a fresh process:
on the CPU its peak resident set (VmHWM), on CUDA torch.cuda.max_memory_allocated; `work` is
the peak above what the process held before the prefill (model, prompt). Writes
results/benchmarks/eval-memory-<device>.{parquet,md}. Run it from the repository root.

    .venv/bin/python scripts/eval_memory.py                   # full, demo, 64K
    .venv/bin/python scripts/eval_memory.py --vocab 0 32000   # and the paper's vocabulary
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ltstudy.plan.benchmark import run_fresh  # noqa: E402

MODES = ("all-logits", "last-logits", "decode")


class NewTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that aten ops create: views and in-place writes into an
    existing tensor (a preallocated cache) create none."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes += t.untyped_storage().nbytes()
        return out


def measure_point(point: dict) -> dict:
    """One point in this process (call it in a fresh one)."""
    from ltstudy.config import default_settings
    from ltstudy.device import autocast, resident_peak_mb
    from ltstudy.models.attention import reserve_kv_cache
    from ltstudy.models.presets import resolve_model
    from ltstudy.models.transformer import build_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = "bf16" if cuda else "fp32"
    cfg = resolve_model(
        point["variant"], point["size"], default_settings()["model"], context=point["context"]
    )
    if point["vocab"]:
        cfg["vocab_size"] = point["vocab"]
    model = build_model(cfg, seed=0, device=device).eval()
    ids = torch.randint(0, cfg["vocab_size"], (1, point["context"]), device=device)
    cache = model.new_cache()
    reserve_kv_cache(cache, point["context"] + point["new_tokens"])

    def peak() -> float:
        return torch.cuda.max_memory_allocated() if cuda else resident_peak_mb() * 2**20

    def held() -> float:
        return torch.cuda.memory_allocated() if cuda else _resident_bytes()

    head_bytes = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: head_bytes.append(out.nbytes))
    before = held()
    step_bytes = []
    with torch.no_grad(), autocast(device, dtype):
        if point["mode"] == "all-logits":
            logits = model(ids, cache)[0, -1]
        else:
            logits = model.logits_at(ids, -1, cache)[0, -1]
        hook.remove()
        for _ in range(point["new_tokens"] if point["mode"] == "decode" else 0):
            token = logits.argmax().reshape(1, 1)
            with NewTensorBytes() as count:
                logits = model.logits_at(token, -1, cache)[0, -1]
            step_bytes.append(count.bytes)
    return {
        "measured_bytes": peak(),
        "work_bytes": peak() - before,
        "logits_bytes": head_bytes[0],
        "step_bytes": statistics.mean(step_bytes) if step_bytes else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "vocab": cfg["vocab_size"],
    }


def _resident_bytes() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


def write_tables(rows: list[dict], out: Path, title: str) -> None:
    import polars as pl

    from ltstudy.io import atomic_path

    with atomic_path(out.with_suffix(".parquet")) as tmp:
        pl.DataFrame(rows).write_parquet(tmp)
    legend = (
        "logits MB: what the LM head returns in the prefill; peak GB: the process's peak; work "
        "GB: the peak above what it held before the prefill; MB/decode step: the new tensors a "
        "decode step creates (mean)."
    )
    lines = [f"# {title}", "", legend, "", "```", HEADER, *(format_row(r) for r in rows), "```"]
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


HEADER = (
    f"{'variant':<8} {'size':<5} {'context':>8} {'vocab':>7} {'mode':<12} {'new':>4} "
    f"{'logits MB':>10} {'peak GB':>8} {'work GB':>8} {'MB/decode step':>14}"
)


def format_row(r: dict) -> str:
    step = f"{r['step_mb']:14.3f}" if r["step_mb"] is not None else f"{'-':>14}"
    peak = f"{r['peak_gb']:8.3f}" if r["peak_gb"] is not None else f"{r['status']:>8}"
    work = f"{r['work_gb']:8.3f}" if r["work_gb"] is not None else f"{'-':>8}"
    logits = f"{r['logits_mb']:10.3f}" if r["logits_mb"] is not None else f"{'-':>10}"
    return (
        f"{r['variant']:<8} {r['size']:<5} {r['context']:>8} {r['vocab']:>7} {r['mode']:<12} "
        f"{r['new_tokens']:>4} {logits} {peak} {work} {step}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="full")
    parser.add_argument("--size", default="demo")
    parser.add_argument("--context", type=int, default=65536)
    parser.add_argument(
        "--vocab", type=int, nargs="+", default=[0], help="vocabulary sizes (0: the preset's)"
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "results" / "benchmarks"))
    args = parser.parse_args()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    out = Path(args.out) / f"eval-memory-{slug}"
    title = f"generation prefill and decode memory on {device}"
    print(HEADER, flush=True)
    rows = []
    for vocab, mode in itertools.product(args.vocab, MODES):
        point = {
            "variant": args.variant,
            "size": args.size,
            "context": args.context,
            "vocab": vocab,
            "mode": mode,
            "new_tokens": args.new_tokens if mode == "decode" else 0,
        }
        status, result = run_fresh("scripts.eval_memory", point)
        rows.append(
            {
                **point,
                "vocab": result["vocab"] if result else vocab,
                "device": result["device"] if result else device,
                "status": status,
                "peak_gb": result["measured_bytes"] / 1e9 if result else None,
                "work_gb": result["work_bytes"] / 1e9 if result else None,
                "logits_mb": result["logits_bytes"] / 1e6 if result else None,
                "step_mb": (
                    result["step_bytes"] / 1e6
                    if result and result["step_bytes"] is not None
                    else None
                ),
            }
        )
        print(format_row(rows[-1]), flush=True)
    write_tables(rows, out, title)
    print(f"wrote {out.with_suffix('.parquet')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        print(json.dumps(measure_point(json.loads(sys.argv[1]))), flush=True)
    else:
        main()
