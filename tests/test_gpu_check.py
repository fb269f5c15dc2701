"""scripts/gpu_check.sh on a simulated GPU machine without network: an interpreter that sees
only the GPU image's packages, pip without an index, and the carried wheels. Here (no GPU) it
runs its CPU part: the kernel tests under Triton's interpreter and the CPU tables."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_gpu_check_runs_offline_with_the_machines_packages_and_the_carried_wheels(tmp_path):
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = {**os.environ, "PY_VERSION": python}
    subprocess.run(["bash", "scripts/fetch_gpu_wheels.sh"], cwd=ROOT, env=env, check=True)
    env = {**os.environ, "OUT": str(tmp_path), "VENV_PY": sys.executable}
    env.pop("TRITON_INTERPRET", None)  # the check sets up its own test session
    done = subprocess.run(
        ["bash", "scripts/simulate_gpu_machine.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "no CUDA GPU: the GPU tests and the GPU tables are skipped" in log
    assert " passed" in log and " failed" not in log
    for table in ("throughput-cpu", "ops-cpu"):
        assert (tmp_path / f"{table}.parquet").stat().st_size > 0
        assert (tmp_path / f"{table}.md").read_text().count("demo") >= 9
    assert (tmp_path / "gpu_check.log").exists()
