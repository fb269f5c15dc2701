"""Snakemake's lock after Snakemake itself was killed: `ltstudy unlock` (which `make demo` runs
first) clears it once no Snakemake works in the directory, and refuses, naming the holder,
while one does; a dry run of a locked directory fails instead of exiting 0."""

import json
import os
import signal
import subprocess
import time

import polars as pl
import pytest

from ltstudy.lock import unlock
from tests.conftest import BIN, MICRO_CONFIG, ROOT, snakemake, write_config

RUN = "micro/full-micro-64"


def ltstudy(workdir, *args):
    return subprocess.run(
        [str(BIN / "ltstudy"), *args], cwd=workdir, capture_output=True, text=True, timeout=120
    )


def test_rerun_after_snakemake_is_killed(tmp_path):
    import yaml

    raw = yaml.safe_load(MICRO_CONFIG.read_text())
    raw["studies"] = [{"name": "micro", "stages": ["train"], "grid": {"variant": ["full"]}}]
    write_config(tmp_path / "one.yaml", raw)
    cmd = [str(BIN / "snakemake"), "--snakefile", str(ROOT / "Snakefile"), "--cores", "2"]
    cmd += ["--configfile=one.yaml", "all"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    first = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    status = tmp_path / "results" / "runs" / RUN / "status" / "train.json"
    try:
        deadline = time.time() + 240
        while not (status.exists() and json.loads(status.read_text())["status"] == "running"):
            assert first.poll() is None and time.time() < deadline, "training never started"
            time.sleep(0.5)
        # while it runs: a dry run fails naming it, and unlock refuses
        dry = snakemake(tmp_path, "--configfile=one.yaml", "-n", "all", check=False)
        assert dry.returncode != 0
        holder = f"the lock is held by snakemake pid {first.pid} on this host"
        assert holder in dry.stdout + dry.stderr
        refused = ltstudy(tmp_path, "unlock")
        assert refused.returncode == 1 and f"snakemake pid {first.pid}" in refused.stderr
        assert any((tmp_path / ".snakemake" / "locks").iterdir())
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # Snakemake and its job processes, as on a crash
        first.wait()

    # the old failure, now with the cure in the message
    locked = snakemake(tmp_path, "--configfile=one.yaml", "all", check=False)
    assert locked.returncode != 0
    assert "The lock is stale (no Snakemake works here any more)" in locked.stdout + locked.stderr
    # what `make demo` runs: unlock, then the same command
    cleared = ltstudy(tmp_path, "unlock")
    assert cleared.returncode == 0 and "removed the stale lock" in cleared.stdout
    snakemake(tmp_path, "--configfile=one.yaml", "all")
    assert pl.read_parquet(tmp_path / "results" / "train_curves.parquet").height == 12
    assert not list(
        (tmp_path / ".snakemake" / "ltstudy-owners").iterdir()
    )  # each run forgets itself
    assert ltstudy(tmp_path, "unlock").stdout.endswith("not locked\n")


def test_lock_recorded_by_another_host_is_not_cleared(tmp_path):
    locks, owners = tmp_path / ".snakemake" / "locks", tmp_path / ".snakemake" / "ltstudy-owners"
    locks.mkdir(parents=True)
    (locks / "0.output.lock").write_text("results/runs.parquet\n")
    owners.mkdir()
    record = {"host": "login-2", "pid": 4242, "started": "2026-01-01 00:00:00"}
    (owners / "login-2.4242.json").write_text(json.dumps(record))
    with pytest.raises(RuntimeError, match="pid 4242 on login-2"):
        unlock(tmp_path)
    assert (locks / "0.output.lock").exists()
    (owners / "login-2.4242.json").unlink()
    assert "removed the stale lock" in unlock(tmp_path)
    assert not locks.exists()


def test_makefile_demo_unlocks_before_snakemake():
    demo = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert demo.index("ltstudy unlock") < demo.index("snakemake --profile workflow/profiles/demo")
