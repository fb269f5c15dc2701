#!/usr/bin/env bash
# One call on a GPU machine, which may have no network: the machine's own python3 with its
# torch; the few pure-Python packages it lacks come as wheels in .whl/ (fetch them on a
# machine with network: scripts/fetch_gpu_wheels.sh). Runs the tests that need CUDA, then
# measures a 1-GPU FSDP2 training step (activation checkpointing full and none) and a prefill
# of 500M and 1.5B at 32K beside the planner's estimate, and writes
# results/benchmarks/memory-<gpu>.{md,parquet} (commit them). With $OUT set, copies the
# tables and the log there. PYTHON names another interpreter; SIZES, VARIANTS and CONTEXTS
# change the measured points (e.g. SIZES=demo CONTEXTS=1024 to try the script on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${TMPDIR:-/tmp}/ltstudy-site
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
LOG=${OUT:-results/benchmarks}/gpu_check.log
mkdir -p "$(dirname "$LOG")"
{
  "$PY" - <<'PYTHON'
import importlib.util, torch
triton = importlib.util.find_spec("triton") and __import__("triton").__version__
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print("torch", torch.__version__, "triton", triton, gpu, flush=True)
PYTHON
  "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
  # shellcheck disable=SC2086  # word lists
  timeout "${MEMORY_TIMEOUT_S:-420}" "$PY" -m ltstudy memory --sizes ${SIZES:-500M 1.5B} \
    --variants ${VARIANTS:-full ttt_full} --contexts ${CONTEXTS:-32768} \
    --modes train prefill --checkpointing full none
  # Context parallelism over NCCL needs a GPU per rank: only on a machine with two or more.
  if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    timeout "${COMM_TIMEOUT_S:-300}" "$PY" scripts/comm_benchmark.py \
      --size "${COMM_SIZE:-500M}" --contexts ${COMM_CONTEXTS:-32768}
  else
    echo "one GPU: the NCCL communication benchmark (scripts/comm_benchmark.py) is skipped"
  fi
} 2>&1 | tee "$LOG"
if [ -n "${OUT:-}" ]; then
  cp results/benchmarks/memory-*.md results/benchmarks/memory-*.parquet "$OUT"/
  cp results/benchmarks/comm-cuda.* "$OUT"/ 2>/dev/null || true
fi
