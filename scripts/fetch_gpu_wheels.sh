#!/usr/bin/env bash
# Download, here (with network), the wheels that scripts/gpu_check.sh installs on a GPU
# machine without network: what ltstudy's GPU path needs beyond the machine's own packages
# (its image has torch, triton, numpy, pyarrow, pyyaml, einops, safetensors, attrs, pytest;
# not jsonschema, nor flash-linear-attention). Then carry .whl/ along (it is git-ignored).
# PY_VERSION: the GPU machine's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
FLA_VERSION=${FLA_VERSION:-0.6.0}
mkdir -p .whl
fetch() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$1"
}
for pkg in jsonschema jsonschema-specifications referencing rpds-py; do
  fetch "${pkg}==$(grep -i "^${pkg}==" requirements.txt | cut -d= -f3)"
done
fetch "fla-core==${FLA_VERSION}"
ls .whl
