"""Check, once before a `launcher: slurm` run submits anything, that Slurm is there and that
every job names a partition and an account where the cluster needs them; otherwise each job
would fail on its own, with submitit's traceback (`Could not detect "srun"`) or sbatch's error.

Called by the Snakefile's onstart hook, which Snakemake runs for real runs only: a dry run
plans without Slurm."""

from __future__ import annotations

import getpass
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from typing import Any

PROFILE = "workflow/profiles/slurm/config.yaml"
HOW = {
    "slurm_partition": "a partition",
    "slurm_account": "an account",
}


class SlurmCheckError(RuntimeError):
    """What a Slurm run lacks, all of it in one message."""


def _command(*args: str) -> str | None:
    """A Slurm command's output, or None where it is missing or fails (e.g. no accounting)."""
    if shutil.which(args[0]) is None:
        return None
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def cluster_needs() -> dict[str, bool]:
    """Which settings a job must give on this cluster: a partition where none is the default
    (`sinfo` marks the default with *), an account where the user has no default one
    (`sacctmgr`) and associations are enforced (or enforcement is unknown)."""
    partitions = _command("sinfo", "-h", "-o", "%P")
    default = _command("sacctmgr", "-n", "show", "user", getpass.getuser(), "format=defaultaccount")
    config = _command("scontrol", "show", "config")
    enforce = ""
    for line in (config or "").splitlines():
        if line.strip().startswith("AccountingStorageEnforce"):
            enforce = line.partition("=")[2]
    enforced = config is None or "associations" in enforce or "limits" in enforce
    return {
        "slurm_partition": partitions is not None
        and not any(p.strip().endswith("*") for p in partitions.split()),
        "slurm_account": default is not None and not default.strip() and enforced,
    }


def _jobs_text(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else f"{len(labels)} jobs ({labels[0]}, ...)"


def slurm_problems(jobs: Iterable[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """What keeps `jobs` ((label, launcher resources) of each job to submit) from running on
    this cluster, one line each; empty if nothing does."""
    jobs = list(jobs)
    if not jobs:
        return []
    missing = [name for name in ("sbatch", "srun") if shutil.which(name) is None]
    if missing:
        return [
            f"{' and '.join(missing)} not found on PATH: run Snakemake on a Slurm login node "
            "(or load Slurm's module), or set `launcher: local` in the config"
        ]
    problems = []
    needs = cluster_needs()
    for key, what in HOW.items():
        empty = [label for label, resources in jobs if resources.get(key) == ""]
        unset = [label for label, resources in jobs if resources.get(key) is None]
        if empty:
            problems.append(
                f'{key} is "" (empty) for {_jobs_text(empty)}: name {what} or remove the entry'
            )
        if unset and needs[key]:
            reason = (
                "the cluster has no default partition (sinfo marks none with *)"
                if key == "slurm_partition"
                else f"user {getpass.getuser()} has no default account (sacctmgr) and "
                "accounts are enforced"
            )
            problems.append(f"{key} is not set for {_jobs_text(unset)}: {reason}")
    return problems


def check_slurm(jobs: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
    """Raise SlurmCheckError naming everything `jobs` lack, and where to set it."""
    problems = slurm_problems(jobs)
    if problems:
        lines = "".join(f"\n  - {problem}" for problem in problems)
        if any(problem.startswith("slurm_") for problem in problems):
            lines += (
                f"\nSet slurm_partition and slurm_account in {PROFILE} (default-resources, e.g. "
                '`- slurm_partition="gpu"`) or per stage in the config (resources.train, '
                "resources.evaluate, defaults.resources.data)."
            )
        raise SlurmCheckError(f"cannot submit to Slurm (nothing was submitted):{lines}")
