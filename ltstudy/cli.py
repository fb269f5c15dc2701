"""Command line: `ltstudy <command>` (or `python -m ltstudy <command>`).

CONFIG (or --configfile PATH) is the study config; without it, the one the last Snakemake run
in this directory used (.snakemake/ltstudy-last-config), else config/config.yaml.

validate [CONFIG]         check a config and print its studies and run counts
runs [CONFIG]             list run ids, one per line (with --targets: their output files)
status [CONFIG]           the state of every run: done, running (stage, progress, ETA,
                          loss), failed (reason, log), pending; --watch [S]: redraw
                          every S seconds (10) until none runs
sizes [--context N]       parameters (meta device), FLOPs per token and weight memory of
                          every variant at every size
stage STAGE RUN [CONFIG]  run one stage of one run in this process, without submitit
collect [CONFIG]          gather the per-run results that exist (failed runs included) into
                          results/partial/ and reports/partial/index.html, e.g. while runs are
                          in flight or after `--keep-going` (Snakemake owns results/*.parquet)
unlock [--directory D]    clear the lock a killed Snakemake left behind, once no Snakemake
                          works in the directory (`make demo` runs it first)
report [--results R] [--reports P] [--baseline RUN]   rebuild the HTML report (index, a page
                          per study, run and run's samples, compare.html) from results tables;
                          --export svg|png [--out DIR]: every chart as a file (reports/export)
throughput [--variants ...] [--sizes ...] [--contexts ...] [--kernels ...]   benchmark on
                          random weights: print a table, write
                          results/benchmarks/throughput-<device>.{parquet,md}
ops [--variants ...] [--sizes ...] [--contexts ...]   each op's fast path (Triton, fla,
                          FlexAttention) against its torch reference, one layer's shapes:
                          results/benchmarks/ops-<device>.{parquet,md}
plan [CONFIG]             every training run's layout (nodes x GPUs, data x context degree,
                          checkpointing, micro-batch), peak memory per GPU and GPU-hours; each
                          evaluation length's context degree and memory per GPU
memory [--variants ...] [--sizes ...] [--contexts ...]   measured peak memory of a training
                          step and a prefill, each in a fresh process, beside the planner's
                          estimate: results/benchmarks/memory-<device>.{parquet,md}
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from ltstudy.config import ConfigError, default_settings, load_study
from ltstudy.configfile import DEFAULT_CONFIG, resolve_config


def _runs(path: str) -> dict[str, dict]:
    return load_study(path)[1]


def cmd_validate(args: argparse.Namespace) -> int:
    config, runs = load_study(args.config)
    per_study = Counter(s["study"] for s in runs.values())
    print(f"{args.config}: valid, {len(runs)} runs")
    for study in config["studies"]:
        runs_in_study = per_study[study["name"]]
        print(f"  {study['name']:<24} {runs_in_study:>5} runs  {study.get('description', '')}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from ltstudy.results.schemas import stage_outputs

    for run_id, spec in _runs(args.config).items():
        if args.targets:
            files = [f for s in spec["stages"] for f in stage_outputs(spec["run_dir"], s).values()]
            print(" ".join(files))
        else:
            print(run_id)
    return 0


def status_table(runs: dict[str, dict], show_pending: bool = False) -> tuple[str, Counter[str]]:
    """The `status` table (one row per run; a failed run's reason and log below it) and the
    count of runs per state. Columns that no row fills are left out."""
    from ltstudy.progress import format_count, format_duration, remaining
    from ltstudy.results.collect import run_status

    header = ["run", "status", "stage", "progress", "eta", "loss"]
    rows, notes, counts = [], {}, Counter()
    for run_id, spec in runs.items():
        state = run_status(spec)
        counts[state["status"]] += 1
        if state["status"] == "pending" and not show_pending:
            continue
        progress = state.get("progress")
        row = [run_id, state["status"], state.get("stage") or "", "", "", ""]
        if progress:
            left = remaining(progress)
            row[3] = format_count(progress)
            row[4] = "" if left is None else format_duration(left)
            row[5] = "" if progress.get("loss") is None else f"{progress['loss']:.4f}"
        if state["status"] == "failed":
            notes[len(rows)] = [f"  reason: {state['reason']}", f"  log:    {state['log']}"]
        rows.append(row)
    keep = [i for i in range(len(header)) if i < 2 or any(row[i] for row in rows)]
    widths = {i: max(len(r[i]) for r in [header, *rows]) for i in keep}
    lines = []
    for n, row in enumerate([header, *rows] if rows else []):
        cells = [row[i].rjust(widths[i]) if i > 3 else row[i].ljust(widths[i]) for i in keep]
        lines.append("  ".join(cells).rstrip())  # eta and loss: right-aligned
        lines += notes.get(n - 1, [])
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines), counts


def cmd_status(args: argparse.Namespace) -> int:
    runs = _runs(args.config)
    if args.watch is None:
        print(status_table(runs, args.all)[0])
        return 0
    clear = "\033[H\033[2J" if sys.stdout.isatty() else "\n"  # redraw a terminal, else reprint
    try:
        while True:
            table, counts = status_table(runs, args.all)
            print(f"{clear}{time.strftime('%H:%M:%S')}  every {args.watch:g}s, Ctrl-C stops")
            print(table, flush=True)
            if not counts["running"]:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def cmd_sizes(args: argparse.Namespace) -> int:
    from ltstudy.config import context_label
    from ltstudy.models.flops import forward_flops_per_token
    from ltstudy.models.presets import SIZES, resolve_model
    from ltstudy.models.transformer import count_parameters
    from ltstudy.models.variants import VARIANTS

    settings = default_settings()["model"]
    flops_header = f"fwd GFLOP/token @{context_label(args.context)}"
    print(
        f"{'size':<6} {'variant':<10} {'parameters':>16} {'vs full':>8} {flops_header:>24} "
        f"{'weights bf16':>13}"
    )
    for size in args.sizes or [s for s in SIZES if s not in ("demo", "micro")]:
        full = None
        for variant in VARIANTS:
            model = resolve_model(variant, size, settings, context=args.context)
            params = count_parameters(model)["total"]
            full = full or params
            flops = forward_flops_per_token(model, params, args.context) / 1e9
            print(
                f"{size:<6} {variant:<10} {params:>16,} {100 * (params / full - 1):>+7.1f}% "
                f"{flops:>24.2f} {params * 2 / 2**30:>9.2f} GiB"
            )
    return 0


def cmd_throughput(args: argparse.Namespace) -> int:
    import torch

    from ltstudy.config import context_label
    from ltstudy.device import device_name, pick_device
    from ltstudy.evaluate.throughput import benchmark
    from ltstudy.models.presets import resolve_model

    device = pick_device()
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    settings = default_settings()
    context = max(args.contexts)
    throughput = {
        **settings["evaluate"]["throughput"],
        "contexts": args.contexts,
        "modes": args.modes,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "decode_tokens": args.decode_tokens,
        "peak_tflops": args.peak_tflops,
    }
    specs = [
        {
            "run_id": f"benchmark/{variant}-{size}-{kernels}",
            "study": "benchmark",
            "variant": variant,
            "size": size,
            "context": context,
            "seed": 0,
            "model": resolve_model(
                variant, size, {**settings["model"], "kernels": kernels}, context=context
            ),
            "train": {"dtype": dtype},
            "evaluate": {"throughput": throughput},
        }
        for size in args.sizes
        for variant in args.variants
        for kernels in args.kernels
    ]
    if device.type == "cpu":
        torch.set_num_threads(args.threads or torch.get_num_threads())
    header = (
        f"{'variant':<10} {'size':<6} {'kernels':<9} {'context':>8} {'mode':<8} "
        f"{'tokens/s':>12} {'spread %':>8} {'memory MB':>10} {'MFU %':>7} {'peak TFLOP/s':>12} "
        f"{'peak from':<9}"
    )
    lines = [
        f"# throughput on {device_name(device)} ({dtype}, batch {args.batch_size})",
        "",
        "MFU: FLOPs per token by the PaLM/torchtitan count (train 6·N + 12·L·H·Q·T) over the "
        "peak, from the GPU's datasheet (dense bf16), measured (a matmul) or given. Spread: "
        "(fastest - slowest repeat) / median. Kernels: the `model.kernels` setting (auto: the "
        "fast kernels on a GPU, the torch forms on the CPU).",
        "",
        "```",
        header,
    ]
    print(header, flush=True)
    out = benchmark_path(args, f"throughput-{slug(device_name(device))}")
    rows = []
    for spec in specs:
        for row in benchmark([spec], args.peak_tflops):
            row["kernels"] = spec["model"]["kernels"]
            rows.append(row)
            ok = row["status"] == "ok"
            speed = f"{row['tokens_per_s']:>12,.0f}" if ok else f"{'OOM':>12}"
            if ok:
                spread = (row["tokens_per_s_max"] - row["tokens_per_s_min"]) / row["tokens_per_s"]
                speed += f" {100 * spread:>8.1f}"
            else:
                speed += f" {'-':>8}"
            memory = f"{row['peak_memory_mb']:>10,.0f}" if ok else f"{'-':>10}"
            mfu = f"{100 * row['mfu']:>7.2f}" if ok else f"{'-':>7}"
            lines.append(
                f"{row['variant']:<10} {row['size']:<6} {row['kernels']:<9} "
                f"{context_label(row['seq_len']):>8} {row['mode']:<8} {speed} {memory} {mfu} "
                f"{row['peak_tflops']:>12.4g} {row['peak_source']:<9}"
            )
            print(lines[-1], flush=True)
        write_benchmark(rows, out, [*lines, "```"])  # after each model: a killed run keeps them
    print(f"wrote {out}.parquet and {out}.md")
    return 0


def cmd_ops(args: argparse.Namespace) -> int:
    import torch

    from ltstudy.device import device_name, pick_device
    from ltstudy.models.presets import resolve_model
    from ltstudy.plan.op_speed import HEADER, fast_paths_available, op_rows

    device = pick_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    settings = default_settings()["model"]
    models = [  # resolved first: a bad size fails before anything is timed
        (size, resolve_model(variant, size, settings, context=max(args.contexts)))
        for size in args.sizes
        for variant in args.variants
    ]
    lines = [
        f"# each op's fast path against its torch reference on {device_name(device)} "
        f"({str(dtype).removeprefix('torch.')}, batch 1)",
        "",
        "Milliseconds per call of one layer's op: train = forward + backward, prefill = "
        "forward. ref/fast: how many times faster the fast path is.",
        "",
    ]
    skipped = fast_paths_available(device)
    if skipped:
        print(skipped, flush=True)
        lines += [skipped, ""]
    lines += ["```", HEADER]
    print(HEADER, flush=True)

    def log(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    out, rows = benchmark_path(args, f"ops-{slug(device_name(device))}"), []
    for size, model in models:
        rows += op_rows(model, size, args.contexts, args.modes, device, dtype, args.repeats, log)
        write_benchmark(rows, out, [*lines, "```"])  # after each model: a killed run keeps them
    print(f"wrote {out}.parquet and {out}.md")
    return 0


def slug(name: str) -> str:
    """A device name as part of a file name: nvidia-h200, cpu."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def benchmark_path(args: argparse.Namespace, name: str) -> Path:
    """results/benchmarks/<name> with --replace (the committed table), else a dated copy."""
    committed = Path(args.out) / name
    if args.replace:
        return committed
    print(f"(the committed {committed}.md is kept; --replace updates it)")
    return committed.with_name(f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def write_benchmark(rows: list[dict], out: Path, lines: list[str]) -> None:
    """A benchmark's rows as <out>.parquet (pyarrow: GPU machines may lack polars) and its
    printed table as <out>.md."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ltstudy.io import atomic_path

    with atomic_path(out.with_suffix(".parquet")) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def cmd_plan(args: argparse.Namespace) -> int:
    from ltstudy.plan import plan_evaluations, plan_run
    from ltstudy.plan.report import eval_table, plan_table

    _, runs = load_study(args.config, check_fit=False)
    trained = [spec for spec in runs.values() if "train" in spec["stages"]]
    plans = [plan_run(spec, mfu=args.mfu, peak_tflops=args.peak_tflops) for spec in trained]
    evaluations = [plan for spec in trained for plan in plan_evaluations(spec)]
    print(plan_table(plans, args.mfu, args.peak_tflops, summary=args.summary))
    print()
    print(eval_table(evaluations, summary=args.summary))
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    import torch

    from ltstudy.plan.benchmark import HEADER, earlier_rows, reestimate, run_points, write_table

    if args.reestimate:
        path = Path(args.reestimate)
        rows = reestimate(path)
        write_table(
            rows, path.with_suffix(""), path.with_suffix(".md").read_text().split("\n")[0][2:]
        )
        print(f"re-estimated {len(rows)} points in {path} and its .md")
        return 0

    points = [
        {
            "variant": variant,
            "size": size,
            "context": context,
            "mode": mode,
            "activation_checkpointing": level,
            "context_parallel": degree,
        }
        for size in args.sizes
        for variant in args.variants
        for mode in args.modes
        for level in (args.checkpointing if mode == "train" else ["none"])
        for degree in (args.context_parallel if mode == "train" else [1])
        for context in args.contexts
    ]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    out = Path(args.out) / f"memory-{slug}"
    title = f"peak memory on {device}: measured, and the planner's estimate"
    kept = earlier_rows(out.with_suffix(".parquet"), points)
    print(HEADER, flush=True)
    run_points(points, on_row=lambda rows: write_table(kept + rows, out, title))
    print(f"wrote {out.with_suffix('.parquet')} and {out.with_suffix('.md')}")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from ltstudy.jobs import run_stage
    from ltstudy.results.schemas import stage_outputs

    runs = _runs(args.config)
    if args.run not in runs:
        print(f"unknown run {args.run!r}; `ltstudy runs {args.config}` lists them", file=sys.stderr)
        return 2
    spec = runs[args.run]
    run_stage(args.stage, spec, stage_outputs(spec["run_dir"], args.stage))
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from ltstudy.report.page import build_report
    from ltstudy.results.collect import PARTIAL, collect_available, incomplete_runs, partial_banner

    config, runs = load_study(args.config)
    results, reports = Path(config["results_dir"]) / PARTIAL, Path(config["reports_dir"]) / PARTIAL
    unreadable = []

    def skip(run_id: str, message: str) -> None:
        print(f"warning: skipped {message}", file=sys.stderr)
        unreadable.append(run_id)

    tables = collect_available(runs, config["results_dir"], on_skip=skip)
    for table, frame in tables.items():
        print(f"{results / table}.parquet: {frame.height} rows")
    banner = partial_banner(incomplete_runs(runs, tables["runs"], unreadable), len(runs))
    print(banner)
    print(f"{build_report(results, reports, partial=banner)} (partial report)")
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    from ltstudy.lock import unlock

    try:
        print(unlock(args.directory))
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ltstudy.report.page import build_report, export_charts

    try:
        if args.export:
            out = Path(args.out or Path(args.reports) / "export")
            written = export_charts(Path(args.results), out, args.export, baseline=args.baseline)
            print(f"{out}: {len(written)} charts as {args.export}")
        else:
            print(build_report(Path(args.results), Path(args.reports), baseline=args.baseline))
    except ValueError as err:  # a baseline that is not a run
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    """The study config of a command: --configfile as with Snakemake, or the older positional
    CONFIG; without either, the last Snakemake run's here, else DEFAULT_CONFIG."""
    parser.add_argument("config", nargs="?", metavar="CONFIG", help="same as --configfile")
    parser.add_argument(
        "--configfile",
        metavar="PATH",
        help=f"the study config (default: the last Snakemake run's here, else {DEFAULT_CONFIG})",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ltstudy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = (
        ("validate", cmd_validate),
        ("runs", cmd_runs),
        ("status", cmd_status),
        ("collect", cmd_collect),
    )
    for name, fn in commands:
        p = sub.add_parser(name)
        _config_arguments(p)
        p.set_defaults(fn=fn)
    sub.choices["runs"].add_argument(
        "--targets", action="store_true", help="print each run's output files instead of its id"
    )
    sub.choices["status"].add_argument("--all", action="store_true", help="list pending runs too")
    sub.choices["status"].add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=10.0,
        metavar="SECONDS",
        help="redraw every SECONDS (default 10) until no run is running",
    )
    p = sub.add_parser("sizes", help="parameters, FLOPs per token and weight memory")
    p.add_argument("--context", type=int, default=32768, help="context of the FLOP count")
    p.add_argument("--sizes", nargs="*", help="size presets (default: 500M ... 14B)")
    p.set_defaults(fn=cmd_sizes)
    from ltstudy.models.variants import VARIANTS

    p = sub.add_parser("throughput", help="benchmark variants on random weights, print a table")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--sizes", nargs="+", default=["demo"])
    p.add_argument("--contexts", nargs="+", type=int, default=[512, 1024, 2048])
    p.add_argument(
        "--modes",
        nargs="+",
        default=["train", "prefill", "decode"],
        choices=["train", "prefill", "decode"],
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="device peak for MFU (default: the GPU's datasheet bf16 peak, else measured)",
    )
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--out", default="results/benchmarks")
    p.add_argument(
        "--replace",
        action="store_true",
        help="write throughput-<device>.{md,parquet} (the committed table) instead of a new "
        "file named with the date and time",
    )
    p.set_defaults(fn=cmd_throughput)
    p.add_argument(
        "--kernels",
        nargs="+",
        default=["auto"],
        choices=["auto", "reference", "triton"],
        help="model.kernels settings to measure (each variant under each)",
    )
    p = sub.add_parser("ops", help="each op's fast path against its torch reference")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--sizes", nargs="+", default=["demo"])
    p.add_argument("--contexts", nargs="+", type=int, default=[1024])
    p.add_argument("--modes", nargs="+", default=["train", "prefill"], choices=["train", "prefill"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/benchmarks")
    p.add_argument(
        "--replace",
        action="store_true",
        help="write ops-<device>.{md,parquet} (the committed table) instead of a dated file",
    )
    p.set_defaults(fn=cmd_ops)
    p = sub.add_parser("plan", help="layout, memory per GPU and GPU-hours of every run")
    _config_arguments(p)
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak (bf16 dense)")
    p.add_argument("--summary", action="store_true", help="one line per group of like runs")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("memory", help="measured peak memory beside the planner's estimate")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--sizes", nargs="+", default=["demo"])
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--modes", nargs="+", default=["train", "prefill"], choices=["train", "prefill"])
    p.add_argument(
        "--checkpointing", nargs="+", default=["none"], choices=["none", "full", "selective"]
    )
    p.add_argument(
        "--context-parallel",
        nargs="+",
        type=int,
        default=[1],
        help="context degrees of train points (K > 1: K processes split the sequence)",
    )
    p.add_argument("--out", default="results/benchmarks")
    p.add_argument(
        "--reestimate",
        metavar="PARQUET",
        help="recompute the planner's column of an existing table (keeping the measurements)",
    )
    p.set_defaults(fn=cmd_memory)
    p = sub.add_parser("stage")
    p.add_argument(
        "stage", choices=["train", "perplexity", "passkey", "ruler", "lm_eval", "throughput"]
    )
    p.add_argument("run")
    _config_arguments(p)
    p.set_defaults(fn=cmd_stage)
    p = sub.add_parser("unlock", help="clear the lock a killed Snakemake left, if it is dead")
    p.add_argument("--directory", default=".", help="Snakemake's working directory")
    p.set_defaults(fn=cmd_unlock)
    p = sub.add_parser("report")
    p.add_argument("--results", default="results")
    p.add_argument("--reports", default="reports")
    p.add_argument("--baseline", help="a run id every run is compared with on compare.html")
    p.add_argument("--export", choices=["svg", "png"], help="write every chart as a file")
    p.add_argument("--out", help="the export folder (default: <reports>/export)")
    p.set_defaults(fn=cmd_report)
    args = parser.parse_args(argv)
    if hasattr(args, "configfile"):
        if args.config and args.configfile and args.config != args.configfile:
            parser.error(f"CONFIG {args.config} and --configfile {args.configfile} differ")
        args.config = resolve_config(args.configfile or args.config)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
