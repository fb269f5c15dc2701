"""Checkpoints load safely: nothing in a checkpoint folder runs code on resume, and one that
does not load is moved aside with a one-line warning while training resumes from the one
before it (or from scratch), onto the uninterrupted run's loss curve.

Each test stops a micro run after its step-8 checkpoint (so steps 4 and 8 are on disk),
damages or crafts the checkpoint files as a fault or an attacker would, and reruns it.
"""

import os
import pickle

import polars as pl
import pytest
from torch.distributed.checkpoint import FileSystemReader

from ltstudy.checkpoint import checkpoint_dirs, save_checkpoint
from ltstudy.io import read_json, write_json
from ltstudy.parallel.distributed import World
from ltstudy.train import build_training_model, job_layout, make_optimizer, run_paths, train
from tests.conftest import micro_spec
from tests.test_distributed import two_rank_job
from tests.test_train import CURVE_COLUMNS

STEPS, EVERY, STOP = 12, 4, 8


class Stop(Exception):
    pass


class RunsCommand:
    """Pickles as a call of os.system: unpickling it runs `command`."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, micro_data) -> pl.DataFrame:
    spec = micro_spec(
        tmp_path_factory.mktemp("ref"), micro_data, steps=STEPS, checkpoint_every=EVERY
    )
    train(spec)
    return pl.read_parquet(run_paths(spec)["curve"]).select(CURVE_COLUMNS)


def stopped_run(tmp_path, micro_data, steps: int = STEPS, stop: int = STOP) -> dict:
    """A run stopped (as if killed) right after its step-`stop` checkpoint."""
    spec = micro_spec(tmp_path, micro_data, steps=steps, checkpoint_every=EVERY)

    def halt(step: int) -> None:
        if step == stop:
            raise Stop

    with pytest.raises(Stop):
        train(spec, on_step=halt)
    return spec


def resume(spec: dict, capsys) -> tuple[pl.DataFrame, list[str], list[str]]:
    """Rerun to the end: (curve, printed lines, the folders under checkpoints/ after its first
    step, before the run removes them)."""
    root = run_paths(spec)["checkpoints"]
    seen = []

    def look(step: int) -> None:
        if not seen:
            seen.extend(sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()))

    capsys.readouterr()
    train(spec, on_step=look)
    lines = capsys.readouterr().out.splitlines()
    return pl.read_parquet(run_paths(spec)["curve"]).select(CURVE_COLUMNS), lines, seen


def _corrupt_rng_state(checkpoint) -> None:
    """Zero the zip header of the RNG state, the item loaded last (found through the
    checkpoint's trusted metadata): the file sizes stay right."""
    metadata = FileSystemReader(checkpoint).read_metadata()
    (info,) = [v for k, v in metadata.storage_data.items() if k.fqn == "rng.cpu"]
    with open(checkpoint / info.relative_path, "r+b") as shard:
        shard.seek(info.offset)
        shard.write(b"\0" * 64)


def record_sizes(checkpoint) -> None:
    """Make train_state.json agree with the files as they are now, as a crafted checkpoint's
    would."""
    state = read_json(checkpoint / "train_state.json")
    files = [f for f in checkpoint.iterdir() if f.name != "train_state.json"]
    state["files"] = {f.name: f.stat().st_size for f in files}
    write_json(checkpoint / "train_state.json", state)


def test_the_two_newest_checkpoints_are_kept(tmp_path, micro_data):
    spec = stopped_run(tmp_path, micro_data, steps=16, stop=12)
    names = [p.name for p in checkpoint_dirs(run_paths(spec)["checkpoints"])]
    assert names == ["step-00000008", "step-00000012"]


def _truncate_shard(path):
    shard = path / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    return "__0_0.distcp is 1,000 bytes"


def _delete_shard(path):
    (path / "__0_0.distcp").unlink()
    return "__0_0.distcp is missing"


def _garble_metadata(path):  # same size: only unpickling finds it
    metadata = path / ".metadata"
    metadata.write_bytes(b"\x80\x05garbage".ljust(metadata.stat().st_size, b"\0"))
    return "/.metadata: "


def _garble_train_state(path):
    (path / "train_state.json").write_text('{"step": 8, "cur')
    return "train_state.json: Unterminated string"


@pytest.mark.parametrize(
    "damage", [_truncate_shard, _delete_shard, _garble_metadata, _garble_train_state]
)
def test_damaged_checkpoint_is_moved_aside_and_the_one_before_resumes(
    tmp_path, micro_data, reference, capsys, damage
):
    spec = stopped_run(tmp_path, micro_data)
    newest = checkpoint_dirs(run_paths(spec)["checkpoints"])[-1]
    reason = damage(newest)
    curve, lines, seen = resume(spec, capsys)
    (warning,) = [line for line in lines if "does not load" in line]
    assert warning.startswith(f"[train] warning: checkpoint {newest} does not load (")
    assert reason in warning and warning.endswith(f"; moved to {newest}.bad")
    assert seen == ["step-00000004", "step-00000008.bad"]
    assert any("resuming from step 4" in line for line in lines)
    assert curve.equals(reference)


def test_half_loaded_checkpoints_fall_back_to_a_fresh_model(
    tmp_path, micro_data, reference, capsys
):
    """Both checkpoints fail late in loading (their last item, the RNG state, is corrupt), after
    the model's weights were read: training starts afresh from the initial weights."""
    spec = stopped_run(tmp_path, micro_data)
    for checkpoint in checkpoint_dirs(run_paths(spec)["checkpoints"]):
        _corrupt_rng_state(checkpoint)
    curve, lines, seen = resume(spec, capsys)
    assert len([line for line in lines if "does not load" in line]) == 2
    assert seen == ["step-00000004.bad", "step-00000008.bad"]
    assert not any("resuming" in line for line in lines)
    assert curve.equals(reference)


def test_malicious_metadata_runs_nothing(tmp_path, micro_data, reference, capsys):
    """A crafted checkpoint whose `.metadata` pickle calls os.system when unpickled (with file
    sizes that match): the command never runs, the refused global is named."""
    spec = stopped_run(tmp_path, micro_data)
    newest = checkpoint_dirs(run_paths(spec)["checkpoints"])[-1]
    marker = tmp_path / "ran"
    (newest / ".metadata").write_bytes(pickle.dumps(RunsCommand(f"touch {marker}")))
    record_sizes(newest)
    curve, lines, _ = resume(spec, capsys)
    assert not marker.exists()
    (warning,) = [line for line in lines if "does not load" in line]
    assert f"{newest / '.metadata'}: refused global posix.system" in warning
    assert curve.equals(reference)


def test_malicious_optimizer_value_runs_nothing(tmp_path, micro_data, reference, capsys):
    """A crafted checkpoint, written by DCP itself, whose optimizer learning rate unpickles as a
    call of os.system (DCP reads such non-tensor values with torch.load(weights_only=False))."""
    spec = stopped_run(tmp_path, micro_data)
    root = run_paths(spec)["checkpoints"]
    newest = checkpoint_dirs(root)[-1]
    state = read_json(newest / "train_state.json")
    marker = tmp_path / "ran"
    world = World()
    model = build_training_model(spec, job_layout(spec, world)[0], world)
    optimizer = make_optimizer(model, spec["train"])
    optimizer.param_groups[0]["lr"] = RunsCommand(f"touch {marker}")
    save_checkpoint(root, STOP, model, optimizer, state, world)
    curve, lines, _ = resume(spec, capsys)
    assert not marker.exists()
    (warning,) = [line for line in lines if "does not load" in line]
    assert "optim.param_groups.0.lr is not a plain value" in warning and "posix.system" in warning
    assert curve.equals(reference)


def test_two_ranks_agree_to_set_damaged_checkpoints_aside(tmp_path, micro_data, reference):
    """A two-rank (FSDP2) job: its newest checkpoint truncated, the one before failing half-way
    through loading. Both ranks set both aside (rank 0 warns) and train afresh, onto the
    one-process curve."""
    spec = stopped_run(tmp_path, micro_data)
    older, newest = checkpoint_dirs(run_paths(spec)["checkpoints"])
    _truncate_shard(newest)
    _corrupt_rng_state(older)
    job = two_rank_job(tmp_path, train, spec)
    job.results()
    warnings = [line for line in job.stdout().splitlines() if "does not load" in line]
    assert [line.split()[3] for line in warnings] == [str(newest), str(older)]
    curve = pl.read_parquet(run_paths(spec)["curve"])["loss"].to_list()
    assert curve == pytest.approx(reference["loss"].to_list(), abs=1e-5)
