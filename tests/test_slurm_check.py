"""A `launcher: slurm` run checks once, before it submits anything, that Slurm's commands are
there and each job names the partition and account the cluster needs; a dry run plans without
Slurm and ends with its jobs per study."""

import re
import shutil

import pytest

from ltstudy.config import load_study
from ltstudy.slurm_check import SlurmCheckError, check_slurm, slurm_problems
from tests.conftest import MICRO_CONFIG, ROOT, snakemake, write_config

NO_SLURM_PATH = "/usr/bin:/bin"  # the snakemake helper puts the virtual environment first
JOBS = [("train micro/full-micro-64", {}), ("passkey micro/full-micro-64", {})]


@pytest.fixture
def micro_dir(tmp_path):
    shutil.copy(MICRO_CONFIG, tmp_path / "micro.yaml")
    return tmp_path


def test_without_sbatch_a_run_stops_before_any_job(micro_dir, monkeypatch):
    if shutil.which("sbatch", path=NO_SLURM_PATH) or shutil.which("srun", path=NO_SLURM_PATH):
        pytest.skip("this machine has Slurm")
    monkeypatch.setenv("PATH", NO_SLURM_PATH)
    proc = snakemake(
        micro_dir, "--configfile=micro.yaml", "--config", "launcher=slurm", "--", "all", check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "cannot submit to Slurm (nothing was submitted):" in output
    assert "sbatch and srun not found on PATH" in output
    assert "Could not detect" not in output  # submitit's per-job traceback
    assert not (micro_dir / "results").exists()
    assert not (micro_dir / ".snakemake" / "ltstudy-last-config").exists()


def test_an_empty_partition_stops_the_run_naming_it(micro_dir, micro_raw, fake_slurm):
    micro_raw["defaults"]["resources"]["train"]["slurm_partition"] = ""
    write_config(micro_dir / "micro.yaml", micro_raw)
    proc = snakemake(
        micro_dir, "--configfile=micro.yaml", "--config", "launcher=slurm", "--", "all", check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert 'slurm_partition is "" (empty) for 3 jobs (train micro/' in output
    assert "slurm_account" not in output.split("nothing was submitted")[1].split("Set ")[0]
    assert "workflow/profiles/slurm/config.yaml (default-resources" in output
    assert fake_slurm.jobs() == {}
    assert not (micro_dir / "results").exists()


def test_a_partition_from_the_profile_passes_the_check_and_reaches_sbatch(
    micro_dir, fake_slurm, monkeypatch
):
    """A cluster without a default partition: the profile's default-resources name one."""
    monkeypatch.setenv("FAKE_SLURM_PARTITIONS", "gpu,cpu")
    data_dir = next(iter(load_study(MICRO_CONFIG)[1].values()))["data_dir"]
    proc = snakemake(
        micro_dir,
        "--configfile=micro.yaml",
        "--config",
        "launcher=slurm",
        "--default-resources",
        'slurm_partition="gpu"',
        "--",
        f"{data_dir}/manifest.json",
    )
    assert "cannot submit" not in proc.stdout + proc.stderr
    [job_id] = fake_slurm.jobs()
    assert fake_slurm.job(job_id)["partition"] == "gpu"
    assert fake_slurm.state(job_id) == "COMPLETED"
    assert (micro_dir / data_dir / "manifest.json").exists()


def test_the_fake_cluster_with_defaults_needs_nothing(fake_slurm):
    assert slurm_problems(JOBS) == []
    check_slurm(JOBS)


def test_no_default_partition_or_account(fake_slurm, monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_PARTITIONS", "gpu,cpu")
    monkeypatch.setenv("FAKE_SLURM_DEFAULT_ACCOUNT", "")
    with pytest.raises(SlurmCheckError) as err:
        check_slurm(JOBS)
    message = str(err.value)
    assert "slurm_partition is not set for 2 jobs (train micro/full-micro-64, ...)" in message
    assert "the cluster has no default partition" in message
    assert "slurm_account is not set for 2 jobs" in message
    named = [(label, {"slurm_partition": "gpu", "slurm_account": "lab"}) for label, _ in JOBS]
    assert slurm_problems(named) == []
    monkeypatch.setenv("FAKE_SLURM_ENFORCE", "none")  # no default account needed
    assert [p.split(" ")[0] for p in slurm_problems(JOBS)] == ["slurm_partition"]


def test_a_dry_run_without_slurm_ends_with_jobs_per_study(micro_dir, monkeypatch):
    """What the README's `snakemake --profile slurm -n all` does on a laptop."""
    monkeypatch.setenv("PATH", NO_SLURM_PATH)
    profile = ROOT / "workflow" / "profiles" / "slurm"
    proc = snakemake(micro_dir, "--profile", str(profile), "--configfile=micro.yaml", "-n", "all")
    output = proc.stdout + proc.stderr
    assert "This was a dry-run" in output and "wildcards:" not in output  # quiet: [rules]
    table = output.split("Jobs per study:\n", 1)[1].splitlines()
    assert re.split(r"\s+", table[0]) == [
        "study",
        *["train", "perplexity", "passkey", "ruler", "lm_eval", "throughput"],
        "total",
    ]
    assert re.split(r"\s+", table[2]) == ["micro", *["3"] * 6, "18"]
    assert re.split(r"\s+", table[3]) == ["total", *["3"] * 6, "18"]
    assert len(table) == 4  # the end of the output
    assert not (micro_dir / ".snakemake" / "ltstudy-last-config").exists()
