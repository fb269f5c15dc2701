"""How long validation and a Snakemake dry run take on a study of N runs (issue 13, item 10).

A real sweep has thousands of runs, so `snakemake -n` must stay quick. This writes a config
of N runs (config/config.yaml's data and defaults, one study whose grid is every variant times
many seeds, default stages: five jobs a run), then times `ltstudy validate` and
`snakemake --profile workflow/profiles/slurm -n --configfile=<it> all` in a temporary working
directory (nothing is written to this repository but the results). Wall, CPU and peak RSS
come from os.wait4 on each child.

    .venv/bin/python scripts/dag_benchmark.py                 # N = 1000 and 10000
    .venv/bin/python scripts/dag_benchmark.py --runs 1000 --label before
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from ltstudy.models.variants import VARIANTS  # noqa: E402


def study_config(runs: int) -> dict:
    """config/config.yaml's settings with one study of at least `runs` runs."""
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    seeds = math.ceil(runs / len(VARIANTS))
    study = {
        "name": "sweep",
        "description": f"every variant x {seeds} seeds",
        "grid": {"variant": list(VARIANTS), "seed": list(range(seeds))},
    }
    return {key: base[key] for key in ("launcher", "data", "defaults")} | {"studies": [study]}


def measure(cmd: list[str], cwd: Path, log: Path) -> dict:
    """Run `cmd` to the end: wall seconds, CPU seconds and peak RSS (MB) of it and its children."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}), log {log}:\n{tail}")
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),  # Linux reports KiB
    }


def benchmark(runs: int, workdir: Path, profile: str) -> list[dict]:
    config = workdir / f"sweep-{runs}.yaml"
    config.write_text(yaml.safe_dump(study_config(runs), sort_keys=False))
    count = len(VARIANTS) * math.ceil(runs / len(VARIANTS))
    commands = {
        "ltstudy validate": [sys.executable, "-m", "ltstudy", "validate", str(config)],
        "snakemake -n all": [
            str(BIN / "snakemake"),
            "--snakefile",
            str(ROOT / "Snakefile"),
            "--profile",
            str(ROOT / "workflow" / "profiles" / profile),
            "--directory",
            str(workdir),
            "-n",
            f"--configfile={config}",
            "all",
        ],
    }
    rows = []
    for name, cmd in commands.items():
        env_cwd = ROOT if name.startswith("ltstudy") else workdir
        figures = measure(cmd, env_cwd, workdir / f"{name.split()[0]}-{runs}.log")
        rows.append({"command": name, "profile": profile, "runs": count, **figures})
        print(f"{name:18} {count:6d} runs  {figures}", flush=True)
    return rows


def text(table: pl.DataFrame) -> str:
    """The table as fixed-width text, a row per line."""
    columns = table.columns
    cells = [columns] + [[str(v) for v in row] for row in table.iter_rows()]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [" ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def write_table(table: pl.DataFrame, path: Path) -> None:
    lines = [
        "# Snakemake DAG scale: validation and dry run on N runs",
        "",
        "`scripts/dag_benchmark.py`: config/config.yaml's defaults, one study of every variant x",
        "N/9 seeds, default stages (5 jobs a run). `snakemake -n` with the named profile, output",
        "to a log file. Wall and CPU in seconds, peak RSS in MB (os.wait4 of the child).",
        "",
        "```",
        text(table),
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--label", default="current", help="a name for this code version")
    parser.add_argument("--profile", default="slurm", help="workflow/profiles/<this>")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "dag")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="dag-benchmark-"))
    rows = []
    for runs in args.runs:
        rows.extend({"code": args.label, **row} for row in benchmark(runs, workdir, args.profile))
    table = pl.DataFrame(rows)
    parquet = args.out.with_suffix(".parquet")
    if parquet.exists():  # keep earlier rows (e.g. `before`) unless this run remeasured them
        old = pl.read_parquet(parquet)
        key = ["code", "command", "profile", "runs"]
        table = pl.concat([old.join(table, on=key, how="anti"), table], how="diagonal_relaxed")
    parquet.parent.mkdir(parents=True, exist_ok=True)
    table.write_parquet(parquet)
    write_table(table, args.out.with_suffix(".md"))
    print(text(table))
    if not args.keep:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
