#!/usr/bin/env bash
# Run scripts/gpu_check.sh here as on the GPU machine: an interpreter that sees only the
# packages of that machine's image (scripts/gpu_image_packages.txt, taken from this checkout's
# .venv), pip with no index, and the wheels of .whl/ (scripts/fetch_gpu_wheels.sh with
# PY_VERSION set to this Python's, e.g. 3.11). Without a GPU the check runs its CPU part.
# OUT receives the log and tables (default: a temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PY=${VENV_PY:-.venv/bin/python}
WORK=$(mktemp -d)
IMAGE="$WORK/image-site"
"$VENV_PY" - "$IMAGE" scripts/gpu_image_packages.txt <<'PYTHON'
"""Link into the image folder every distribution of this environment that the image has."""
import importlib.metadata as md, os, re, sys
from pathlib import Path

image, listing = Path(sys.argv[1]), Path(sys.argv[2])
def norm(name): return re.sub(r"[-_.]+", "-", name).lower()
wanted = {norm(l) for l in listing.read_text().split() if l and not l.startswith("#")}
image.mkdir(parents=True)
for dist in md.distributions():
    if norm(dist.metadata["Name"]) not in wanted:
        continue
    site = Path(dist.locate_file(""))
    for top in {Path(str(f)).parts[0] for f in dist.files or ()}:
        source, target = site / top, image / top
        if top != ".." and source.exists() and not target.exists():
            os.symlink(source, target)
PYTHON
BASE=$("$VENV_PY" -c 'import sys; print(sys.base_prefix)')/bin/python3
"$BASE" -m venv "$WORK/machine"
SITE=$("$WORK/machine/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$IMAGE" > "$SITE/gpu-image.pth"
mkdir -p "${OUT:=$WORK/out}"
echo "simulated GPU machine: $WORK/machine (image packages: $(ls "$IMAGE" | wc -l) entries)"
env PIP_NO_INDEX=1 PIP_CONFIG_FILE=/dev/null TMPDIR="$WORK" OUT="$OUT" \
  PYTHON="$WORK/machine/bin/python" bash scripts/gpu_check.sh
