"""Shared fixtures: the repository root, a micro study config, a prepared micro dataset."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

# Triton kernels run on CPU tensors under Triton's interpreter, which is chosen when a kernel
# module is imported: set it before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
MICRO_CONFIG = ROOT / "tests" / "configs" / "micro.yaml"
BIN = Path(sys.executable).parent
# A tiny Qwen3 checkpoint's dimensions (transformers.Qwen3Config arguments).
TINY_QWEN3 = {
    "vocab_size": 300,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "intermediate_size": 64,
}


@pytest.fixture
def micro_raw() -> dict:
    return yaml.safe_load(MICRO_CONFIG.read_text())


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory) -> Path:
    """A small tokenized corpus shared by tests that train."""
    from ltstudy.config import load_config
    from ltstudy.data.dataset import build_dataset

    config = load_config(MICRO_CONFIG)
    out = tmp_path_factory.mktemp("data")
    build_dataset(config["data"], out)
    return out


def micro_spec(tmp_path: Path, data_dir: Path, run: str = "micro/full-micro-64", **train) -> dict:
    from ltstudy.config import expand_runs, load_config

    config = load_config(MICRO_CONFIG)
    spec = copy.deepcopy(expand_runs(config)[run])
    spec["train"].update(train)
    spec["run_dir"] = str(tmp_path / "run")
    spec["data_dir"] = str(data_dir)
    return spec


def launch_stage(stage: str, spec: dict, outputs=None, launcher: str = "local", **resources):
    """Launch one stage of a run as the workflow's rules do, on the CPU."""
    from ltstudy.launch import launch

    return launch(
        stage,
        spec,
        label=spec["run_id"],
        work_dir=spec["run_dir"],
        outputs=outputs or {},
        resources={"gpu": 0, "runtime": 10, **resources},
        launcher=launcher,
    )


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real workflow (Snakefile of this repo) with `workdir` as its working directory."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [
        str(BIN / "snakemake"),
        "--snakefile",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--cores",
        "2",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def study(tmp_path_factory):
    """The micro study run once through the real workflow: (workdir, snakemake output)."""
    workdir = tmp_path_factory.mktemp("study")
    shutil.copy(MICRO_CONFIG, workdir / "micro.yaml")
    proc = snakemake(workdir, "--configfile=micro.yaml", "all")
    return workdir, proc.stdout + proc.stderr


def chromium() -> str | None:
    for name in (
        os.environ.get("LTSTUDY_BROWSER"),
        "chromium",
        "chromium-browser",
        "google-chrome",
    ):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """Slurm's commands first on PATH, running jobs on this machine (tests/fake_slurm), with a
    fresh state folder; yields its handle (jobs, states, starts, signals) and kills what is left."""
    import time

    import submitit

    from tests.fake_slurm.handle import FakeSlurm

    # job ids from the clock (ms), unique in the session: submitit's watcher caches finished
    # ids, and a multi-task job's rendezvous port derives from its id
    slurm = FakeSlurm(tmp_path / "fake-slurm", first_id=time.time_ns() // 10**6 % 10**9)
    for key, value in slurm.environment().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(submitit.SlurmJob.watcher, "_delay_s", 1)  # sacct every second, not 10 min
    yield slurm
    slurm.shutdown()
