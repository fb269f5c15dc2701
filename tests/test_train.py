"""Training: the schedule, real learning, and resume after an interruption.

A run killed midway (SIGTERM: checkpoint at the next step boundary; SIGKILL: the last periodic
checkpoint survives) resumes when rerun, and the resumed loss curve is the uninterrupted one.
"""

import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch

from ltstudy.checkpoint import checkpoint_dirs, read_metadata
from ltstudy.config import validate_config
from ltstudy.data.dataset import TokenData, build_dataset
from ltstudy.io import read_json, write_json
from ltstudy.models.transformer import build_model
from ltstudy.train import load_trained, lr_at, run_paths, train
from tests.conftest import micro_spec

# Runs training in a child process, slowed per step so the test can interrupt it mid-run.
CHILD = """
import json, sys, time
from ltstudy.train import train
spec = json.load(open(sys.argv[1]))
train(spec, on_step=lambda step: time.sleep(0.25))
"""
CURVE_COLUMNS = ["step", "tokens", "loss", "lr", "grad_norm"]


def masked_mean(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean loss over the positions `mask` marks."""
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def test_lr_warmup_then_cosine():
    cfg = {"lr": 1.0, "warmup_steps": 10, "steps": 110, "min_lr_ratio": 0.1, "schedule": "cosine"}
    lrs = [lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55, abs=0.01)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))


def test_lr_warmup_stable_decay():
    cfg = {"lr": 1.0, "warmup_steps": 10, "steps": 100, "min_lr_ratio": 0.0}
    lrs = [lr_at(s, {**cfg, "schedule": "wsd", "decay_fraction": 0.2}) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9:80] == [1.0] * 71  # held through step 80
    assert lrs[89] == pytest.approx(0.5) and lrs[-1] == pytest.approx(0.0)
    assert all(a > b for a, b in itertools.pairwise(lrs[79:]))


def test_training_learns_and_writes_outputs(tmp_path, micro_data):
    spec = micro_spec(tmp_path, micro_data, run="micro/ttt_swa-micro-64", steps=30, lr=1e-2)
    summary = train(spec)
    paths = run_paths(spec)
    curve = pl.read_parquet(paths["curve"])
    assert curve["step"].to_list() == list(range(1, 31))
    assert curve["loss"][-5:].mean() < curve["loss"][0] - 1.0  # from ~ln(258)=5.55 well down
    assert summary["final_loss"] == curve["loss"][-1]
    metadata = read_metadata(paths["model"])
    assert metadata["config_hash"] == spec["config_hash"] and metadata["step"] == "30"
    assert metadata["world_size"] == "1" and summary["world_size"] == 1
    assert not paths["checkpoints"].exists()  # checkpoints removed after success


def test_one_document_windows_leave_padding_out_of_the_loss(tmp_path, micro_raw):
    micro_raw["data"]["synthetic"] = {"fraction": 0.8, "size": 130, "mix": {"passkey": 1}}
    data_dir = tmp_path / "data"
    build_dataset(validate_config(micro_raw)["data"], data_dir)
    spec = micro_spec(tmp_path, data_dir, steps=1, windows="one_document")
    spec["context"] = 256  # windows twice as long as the documents
    batch = TokenData.load(data_dir, "train").sample_batch(
        spec["train"]["batch_size"], spec["context"] + 1, spec["seed"], 0, "one_document"
    )
    assert batch.padding.float().mean() > 0.3  # short documents: most of each window is padding
    with torch.no_grad():  # the initial model, which the first step's loss is measured on
        losses = build_model(spec["model"], seed=spec["seed"]).token_losses(
            batch.tokens[:, :-1], batch.tokens[:, 1:]
        )
    real = float(masked_mean(losses, ~batch.padding[:, 1:]))
    assert abs(real - float(losses.mean())) > 1e-3  # far beyond the tolerance below
    train(spec)
    assert pl.read_parquet(run_paths(spec)["curve"])["loss"][0] == pytest.approx(real, rel=1e-5)


def test_trailing_padding_columns_are_dropped_and_nothing_else():
    from ltstudy.train import without_trailing_padding

    padding = torch.tensor([[False, False, True, True, True], [False, False, False, True, True]])
    tokens = torch.arange(10).reshape(2, 5)
    kept, mask = without_trailing_padding(tokens, padding)
    assert torch.equal(kept, tokens[:, :3]) and torch.equal(mask, padding[:, :3])
    full = torch.zeros(2, 5, dtype=torch.bool)  # random windows: no padding, nothing dropped
    assert without_trailing_padding(tokens, full)[0].shape == (2, 5)


def test_answer_loss_weight_trains_on_marked_answers(tmp_path, micro_raw):
    """With the weight, the marked answers (passkey keys) get the gradient: their loss falls
    faster than under plain next-token loss from the same start."""
    micro_raw["data"]["synthetic"] = {"fraction": 0.8, "size": 120, "mix": {"passkey": 1}}
    data_dir = tmp_path / "data"
    build_dataset(validate_config(micro_raw)["data"], data_dir)
    data = TokenData.load(data_dir, "train")
    tokens, marked, _ = data.sample_batch(64, 65, seed=7, step=0)

    def answer_loss_after(weight: float) -> float:
        spec = micro_spec(tmp_path / str(weight), data_dir, steps=40, lr=1e-2)
        spec["train"]["answer_loss_weight"] = weight
        train(spec)
        model = load_trained(spec, torch.device("cpu"))
        with torch.no_grad():
            losses = model.token_losses(tokens[:, :-1], tokens[:, 1:])
        return float(masked_mean(losses, marked[:, 1:]))

    weighted, plain = answer_loss_after(20.0), answer_loss_after(0.0)
    assert weighted < plain - 0.5  # measured: 2.4 against 3.4


def test_answer_loss_weight_needs_marked_answers(tmp_path, micro_data):
    spec = micro_spec(tmp_path, micro_data, steps=2, answer_loss_weight=3.0)
    with pytest.raises(ValueError, match=r"answer_loss_weight.*marks no answer tokens"):
        train(spec)


def _start(spec_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def saved_step(root: Path) -> int | None:
    """The step of the newest complete checkpoint under `root`."""
    found = checkpoint_dirs(root)
    return read_json(found[-1] / "train_state.json")["step"] if found else None


def _wait_for_checkpoint(
    path: Path, step: int, proc: subprocess.Popen, timeout: float = 120
) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (saved_step(path) or 0) >= step:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint at step {step}")


def test_interrupted_run_resumes_and_continues_the_curve(tmp_path, micro_data):
    reference_spec = micro_spec(tmp_path / "ref", micro_data, steps=16, checkpoint_every=4)
    train(reference_spec)
    reference = pl.read_parquet(run_paths(reference_spec)["curve"]).select(CURVE_COLUMNS)

    spec = micro_spec(tmp_path / "int", micro_data, steps=16, checkpoint_every=4)
    paths = run_paths(spec)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))

    # 1. SIGTERM: the child finishes its step, checkpoints there and exits with an error.
    proc = _start(spec_path)
    _wait_for_checkpoint(paths["checkpoints"], 4, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "TrainingInterrupted" in out
    stopped_at = saved_step(paths["checkpoints"])
    assert 4 <= stopped_at < 16 and not paths["model"].exists()

    # 2. Rerun; resumes from there. SIGKILL it: no chance to save, the periodic checkpoint stays.
    proc = _start(spec_path)
    _wait_for_checkpoint(paths["checkpoints"], max(8, stopped_at + 1), proc)
    proc.kill()
    out, _ = proc.communicate(timeout=60)
    assert f"resuming from step {stopped_at}" in out
    killed_at = saved_step(paths["checkpoints"])
    assert killed_at > stopped_at

    # 3. Rerun to the end: the stitched curve is exactly the uninterrupted one.
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
        train(spec)
    assert any(f"resuming from step {killed_at}" in line for line in lines)
    resumed = pl.read_parquet(paths["curve"]).select(CURVE_COLUMNS)
    assert resumed["step"].to_list() == list(range(1, 17))
    assert resumed.equals(reference)


def test_checkpoint_of_another_config_is_not_resumed(tmp_path, micro_data):
    spec = micro_spec(tmp_path, micro_data, steps=4)
    paths = run_paths(spec)
    other = paths["checkpoints"] / "step-00000003"
    other.mkdir(parents=True)
    write_json(other / "train_state.json", {"config_hash": "something-else", "step": 3})
    train(spec)
    assert pl.read_parquet(paths["curve"])["step"].to_list() == [1, 2, 3, 4]


def test_objective_does_not_depend_on_the_micro_batch(tmp_path, micro_raw):
    """Padded one-document windows with weighted answers: the mean runs over the global
    batch's tokens, so micro-batches of 4 (one forward) and of 1 give the same gradients (the
    planner picks the micro-batch, and it may change when a run resumes elsewhere)."""
    from ltstudy.parallel.distributed import joined_world
    from tests.distributed_jobs import first_gradients

    micro_raw["data"]["synthetic"] = {"fraction": 0.8, "size": 300, "mix": {"passkey": 1}}
    data_dir = tmp_path / "data"
    build_dataset(validate_config(micro_raw)["data"], data_dir)
    grads = {}
    for micro in (4, 1):
        spec = micro_spec(tmp_path / str(micro), data_dir, windows="one_document")
        spec["context"] = 256  # windows longer than the documents: padding differs per row
        spec["train"]["answer_loss_weight"] = 3.0
        spec["layout"]["micro_batch_size"] = micro
        with joined_world() as world:
            grads[micro] = first_gradients(spec, world)
    for step in range(2):
        for name, expected in grads[4][step].items():
            torch.testing.assert_close(grads[1][step][name], expected, rtol=0, atol=1e-6)
