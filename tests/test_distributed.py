"""Data-parallel training with FSDP2 on real ranks: two processes started by submitit's local
executor (gloo on the CPU), as a Slurm job's tasks would be.

Two ranks give the single process's loss curve and gradients, with and without gradient
accumulation, for every variant; a two-rank run killed mid-way resumes from its sharded
checkpoint on one rank and on two.
"""

import copy
import shutil
import signal
import time

import polars as pl
import psutil
import pytest
import torch

from ltstudy.checkpoint import read_metadata
from ltstudy.launch import make_executor, read_status, submitit_parameters
from ltstudy.models.variants import VARIANTS
from ltstudy.parallel.distributed import joined_world
from ltstudy.train import run_paths, train
from tests.conftest import launch_stage
from tests.distributed_jobs import first_gradients, slow_train, train_and_gradients
from tests.test_train import saved_step

# multi-process runs (submitit ranks, killed and resumed jobs): `make test-slow`, in CI
pytestmark = pytest.mark.slow

STEPS = 20


def spec_for(tmp_path, data, variant, name, micro):
    (spec,) = micro_variant_specs(tmp_path, data, [variant])
    spec["run_dir"] = str(tmp_path / name / "run")
    spec["layout"]["micro_batch_size"] = micro
    return spec


def two_rank_job(tmp_path, fn, *args):
    params = submitit_parameters({"gpu": 0, "runtime": 20, "tasks_per_node": 2}, "local", "t")
    return make_executor("local", tmp_path / "jobs", params).submit(fn, *args)


def losses(spec):
    return pl.read_parquet(run_paths(spec)["curve"])["loss"].to_numpy()


def micro_variant_specs(tmp_path, micro_data, variants):
    """Micro runs of each variant with one variant-specific model per run id."""
    from ltstudy.config import expand_runs, load_config
    from tests.conftest import MICRO_CONFIG

    raw = load_config(MICRO_CONFIG)
    raw["studies"][0]["grid"]["variant"] = list(variants)
    runs = expand_runs(raw)
    out = []
    for variant in variants:
        spec = copy.deepcopy(runs[f"micro/{variant}-micro-64"])
        spec["data_dir"] = str(micro_data)
        spec["train"]["steps"] = STEPS
        out.append(spec)
    return out


def test_two_ranks_give_the_single_process_curve_and_gradients(tmp_path, micro_data):
    """Every variant, 20 steps in fp32: 2 ranks (2 sequences each, one micro-batch) and 2 ranks
    x accumulation 2 (micro-batches of 1, and every block checkpointed) against one process
    (micro-batches of 2); also one variant's gradients with hybrid sharding."""
    base = micro_variant_specs(tmp_path, micro_data, list(VARIANTS))

    def copies(name, micro):
        out = []
        for spec in base:
            s = copy.deepcopy(spec)
            s["run_dir"] = str(tmp_path / name / s["name"])
            s["layout"]["micro_batch_size"] = micro
            out.append(s)
        return out

    single, ranks, accumulated = copies("one", 2), copies("two", 2), copies("accum", 1)
    for spec in accumulated:
        spec["layout"]["activation_checkpointing"] = "full"
    (hybrid,) = copies("hybrid", 2)[:1]
    hybrid["layout"]["hybrid_shard"] = True
    job = two_rank_job(tmp_path, train_and_gradients, ranks + accumulated, [hybrid])
    with joined_world() as world:  # one process: no process group, the plain model
        reference = []
        for spec in single:
            train(spec)
            reference.append(first_gradients(spec, world))
    parallel = job.results()[0]
    for index, spec in enumerate(single):
        for other, grads in ((ranks, parallel[index]), (accumulated, parallel[9 + index])):
            assert losses(other[index]) == pytest.approx(losses(spec), abs=1e-5), spec["variant"]
            for step in range(2):
                for name, expected in reference[index][step].items():
                    torch.testing.assert_close(
                        grads[step][name], expected, rtol=0, atol=1e-6, msg=name
                    )
            assert read_metadata(run_paths(other[index])["model"])["world_size"] == "2"
    for step in range(2):  # hybrid sharding: base[0]'s variant
        for name, expected in reference[0][step].items():
            torch.testing.assert_close(parallel[18][step][name], expected, rtol=0, atol=1e-6)


def test_two_rank_job_records_its_world_size(tmp_path, micro_data):
    """The real launch path: a training stage with two tasks per node, the curve equal to one
    process's, the world size in the model's metadata and the stage's status."""
    spec = spec_for(tmp_path, micro_data, "ttt_swa", "two", micro=2)
    spec["layout"]["tasks_per_node"] = spec["resources"]["train"]["tasks_per_node"] = 2
    reference = spec_for(tmp_path, micro_data, "ttt_swa", "one", micro=2)
    train(reference)
    launch_stage("train", spec, tasks_per_node=2, runtime=20)
    assert losses(spec) == pytest.approx(losses(reference), abs=1e-5)
    assert read_status(spec["run_dir"], "train")["world_size"] == 2
    assert read_metadata(run_paths(spec)["model"])["world_size"] == "2"


def test_killed_two_rank_run_resumes_on_one_rank_and_on_two(tmp_path, micro_data):
    """SIGKILL both ranks after the step-12 checkpoint; resume a copy on one rank and another
    on two: both reach the uninterrupted run's step-20 loss."""
    reference = spec_for(tmp_path, micro_data, "deltanet", "ref", micro=1)
    train(reference)
    spec = spec_for(tmp_path, micro_data, "deltanet", "killed", micro=1)
    spec["train"]["checkpoint_every"] = 4
    checkpoints = run_paths(spec)["checkpoints"]
    job = two_rank_job(tmp_path, slow_train, spec, 0.3)
    deadline = time.time() + 180
    while (saved_step(checkpoints) or 0) < 12:
        assert time.time() < deadline and not job.done(), job.stdout()
        time.sleep(0.02)
    controller = psutil.Process(int(job.job_id))
    for process in [*controller.children(recursive=True), controller]:
        process.send_signal(signal.SIGKILL)
    job.wait()
    assert saved_step(checkpoints) == 12 and not run_paths(spec)["model"].exists()

    resumed = {}
    for ranks in (1, 2):
        copy_spec = copy.deepcopy(spec)
        copy_spec["run_dir"] = str(tmp_path / f"resume{ranks}")
        shutil.copytree(spec["run_dir"], copy_spec["run_dir"])
        if ranks == 1:
            train(copy_spec)
        else:
            two_rank_job(tmp_path, train, copy_spec).results()
        resumed[ranks] = losses(copy_spec)
    expected = losses(reference)
    for ranks, curve in resumed.items():
        assert len(curve) == STEPS, ranks
        assert curve[-1] == pytest.approx(expected[-1], abs=1e-5), ranks
        assert curve == pytest.approx(expected, abs=1e-5), ranks
