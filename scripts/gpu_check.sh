#!/usr/bin/env bash
# One call on a GPU machine: install, run the tests that need CUDA, then benchmark 500M and
# 1.5B at 32K. Writes the benchmark table under results/benchmarks/ (commit it) and, if $OUT is
# set, copies it there. Usage: scripts/gpu_check.sh   (TORCH_SPEC may name a CUDA build of
# torch; PEAK_TFLOPS the device's dense bf16 peak, default the H100/H200's 989).
set -euo pipefail
cd "$(dirname "$0")/.."
make setup TORCH_SPEC="${TORCH_SPEC:-torch}"
. .venv/bin/activate
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
pytest -q -m gpu
ltstudy throughput --sizes 500M 1.5B --contexts 32768 --modes train prefill decode \
  --batch-size 1 --warmup 2 --repeats 5 --decode-tokens 32 --dtype bf16 \
  --peak-tflops "${PEAK_TFLOPS:-989}"
if [ -n "${OUT:-}" ]; then cp results/benchmarks/throughput-*.md results/benchmarks/throughput-*.parquet "$OUT"/; fi
