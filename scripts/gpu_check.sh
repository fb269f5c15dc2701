#!/usr/bin/env bash
# One call on a GPU machine: install, run the GPU tests, benchmark 500M and 1.5B at 32K, then
# measure how many steps a demo-size model needs for passkey retrieval
# (config/retrieval-budget.yaml). Writes the benchmark table under results/benchmarks/ (commit
# it) and, if $OUT is set, copies the tables, the budget study's report and its `full` weights
# there. Usage: scripts/gpu_check.sh [all|bench|budget]   (default all; TORCH_SPEC may name a
# CUDA build of torch). `bench` and `budget` split the work over two calls on a warm machine.
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:-all}"
case "$part" in all | bench | budget) ;; *) echo "usage: $0 [all|bench|budget]" >&2; exit 2 ;; esac
make setup TORCH_SPEC="${TORCH_SPEC:-torch}"
. .venv/bin/activate
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
if [ "$part" != budget ]; then
  pytest -q -m gpu
  ltstudy throughput --sizes 500M 1.5B --contexts 32768 --modes train prefill decode \
    --batch-size 1 --warmup 2 --repeats 5 --decode-tokens 32 --dtype bf16 \
    --peak-tflops "${PEAK_TFLOPS:-989}"
  if [ -n "${OUT:-}" ]; then cp results/benchmarks/throughput-*.md results/benchmarks/throughput-*.parquet "$OUT"/; fi
fi
[ "$part" = bench ] && exit 0

budget=results/retrieval-budget
snakemake all --profile workflow/profiles/local --resources gpu=1 \
  --configfile config/retrieval-budget.yaml
python - "$budget/passkey.parquet" <<'PY'
import sys
import polars as pl

pl.Config(tbl_rows=-1, fmt_str_lengths=60)
WINDOW = 64  # swa_window of the demo size preset
table = pl.read_parquet(sys.argv[1]).with_columns(
    pl.when(pl.col("needle_distance") < WINDOW)
    .then(pl.lit(f"<{WINDOW} (in window)"))
    .otherwise(pl.lit(f">={WINDOW}"))
    .alias("distance")
)
print(
    table.group_by("run_id", "length", "distance")
    .agg(pl.col("correct").mean().alias("accuracy"), pl.len().alias("n"))
    .sort("run_id", "length", "distance")
)
PY
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/retrieval-budget"
  cp "$budget"/*.parquet "$OUT/retrieval-budget/"
  cp -r reports/retrieval-budget "$OUT/retrieval-budget/report"
  for run in "$budget"/runs/budget_full/*/; do
    dest="$OUT/retrieval-budget/$(basename "$run")"
    mkdir -p "$dest"
    cp "$run/model.pt" "$run/spec.json" "$dest/"
  done
fi
