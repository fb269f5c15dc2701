#!/usr/bin/env bash
# One call on a GPU machine, which may have no network: the machine's own python3 with its
# torch and triton; the few pure-Python packages it lacks come as wheels in .whl/ (fetch them
# on a machine with network: scripts/fetch_gpu_wheels.sh), installed without an index.
#   1. the kernel tests: every fast path against its reference (library kernels, FlexAttention,
#      our Triton), SDPA's backend, every variant's bf16 step and cached decoding;
#   2. results/benchmarks/throughput-<gpu>.{md,parquet}: every variant's train / prefill /
#      decode tokens/s, peak memory and MFU (500M and 1.5B at 8K and 32K, bf16, batch 1);
#   3. results/benchmarks/ops-<gpu>.{md,parquet}: each op's fast path against its reference.
# Commit the tables. Without a GPU it says so, runs the kernel tests under Triton's
# interpreter and prints the CPU tables (demo size) into $OUT or a temporary folder. $OUT, if
# set, also receives the tables and the log. PYTHON names another interpreter; SIZES,
# CONTEXTS, VARIANTS, OP_SIZES, OP_CONTEXTS change the points; MEMORY=1 adds `ltstudy memory`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${TMPDIR:-/tmp}/ltstudy-site
export PIP_NO_INDEX=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:$PWD"
else
  export PYTHONPATH="$PWD"
fi
CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')
if [ "$CUDA" = 1 ]; then
  TABLES=results/benchmarks
  REPLACE=--replace
  SIZES=${SIZES:-1.5B 500M} CONTEXTS=${CONTEXTS:-8192 32768}  # the targets are at 1.5B: first
  OP_SIZES=${OP_SIZES:-1.5B} OP_CONTEXTS=${OP_CONTEXTS:-8192 32768}
else
  TABLES=${OUT:-$(mktemp -d)}
  REPLACE=--replace
  SIZES=${SIZES:-demo} CONTEXTS=${CONTEXTS:-512}
  OP_SIZES=${OP_SIZES:-demo} OP_CONTEXTS=${OP_CONTEXTS:-512}
fi
LOG=${OUT:-$TABLES}/gpu_check.log
mkdir -p "$TABLES" "$(dirname "$LOG")"
{
  "$PY" - <<'PYTHON'
import importlib.util, torch
def version(name):
    return importlib.util.find_spec(name) and __import__(name).__version__
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print("torch", torch.__version__, "triton", version("triton"), "fla", version("fla"), gpu)
PYTHON
  if [ "$CUDA" != 1 ]; then
    echo "no CUDA GPU: the GPU tests and the GPU tables are skipped; the kernel tests run" \
      "under Triton's interpreter and the tables below are the CPU's (demo size)"
  fi
  # The files by name: the other test modules need the workflow's packages (polars, ...).
  "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_ttt_triton.py \
    tests/test_lact_triton.py tests/test_flex_attention.py tests/test_fla.py
  # shellcheck disable=SC2086  # word lists
  timeout "${THROUGHPUT_TIMEOUT_S:-240}" "$PY" -m ltstudy throughput --sizes $SIZES \
    --contexts $CONTEXTS --variants ${VARIANTS:-full swa hybrid gla deltanet mamba2 lact ttt_full ttt_swa} \
    --repeats 2 --out "$TABLES" $REPLACE || echo "throughput stopped (exit $?): the table holds the points measured"
  # shellcheck disable=SC2086
  timeout "${OPS_TIMEOUT_S:-150}" "$PY" -m ltstudy ops --sizes $OP_SIZES --contexts $OP_CONTEXTS \
    --repeats 3 --out "$TABLES" $REPLACE || echo "ops stopped (exit $?): the table holds the points measured"
  if [ "${MEMORY:-0}" = 1 ]; then
    # shellcheck disable=SC2086
    "$PY" -m ltstudy memory --sizes $SIZES --variants full ttt_full --contexts 32768 \
      --modes train prefill --checkpointing full none
  fi
} 2>&1 | tee "$LOG"
if [ -n "${OUT:-}" ] && [ "$TABLES" != "$OUT" ]; then
  cp "$TABLES"/throughput-*.md "$TABLES"/throughput-*.parquet "$TABLES"/ops-*.md \
    "$TABLES"/ops-*.parquet "$OUT"/ 2>/dev/null || true
fi
