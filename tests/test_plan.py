"""The planner: the memory census on the meta device counts what real tensors take, the full
study fits its GPUs up to 64K (longer runs name the context degree they need), `auto` picks the
least recomputation that fits, and a run that fits under no layout fails validation with its
numbers; a run that needs context parallelism is refused before any job is submitted."""

import json

import pytest
import torch

from ltstudy.cli import main
from ltstudy.config import ConfigError, default_settings, expand_runs, load_study, validate_config
from ltstudy.launch import LaunchError, read_status
from ltstudy.models.presets import resolve_model
from ltstudy.models.transformer import build_model
from ltstudy.plan.census import LiveBytes, _model, block_kinds, block_memory, outer_memory
from tests.conftest import ROOT, launch_stage, micro_spec


@pytest.mark.parametrize("variant", ["full", "swa", "gla", "deltanet", "lact", "ttt_swa"])
def test_meta_census_counts_what_real_cpu_tensors_take(variant):
    """Kept activations of each kind of block, and of the loss head, at demo width: the meta
    count (with the fused-attention stand-in) against the same count on real CPU tensors, where
    torch runs its own CPU flash attention."""
    settings = default_settings()["model"]
    settings["ttt"].update(chunk_size=64, every=2)
    cfg = resolve_model(variant, "demo", settings, context=512)
    key = json.dumps(cfg, sort_keys=True)
    real = build_model(cfg, seed=0)
    T = 256
    for layers in block_kinds(cfg).values():
        block = real.layers[layers[0]]
        x = torch.randn(1, T, cfg["d_model"], requires_grad=True)
        rope = real.rotary(0, T, x.device)
        with LiveBytes() as live:
            out = block(x, x.detach(), rope)
            kept = live.live
        del out
        assert block_memory(key, "cpu", "fp32", layers[0], T).kept == pytest.approx(kept, rel=0.05)
    ids = torch.randint(0, cfg["vocab_size"], (1, T + 1))
    layers, real.layers = real.layers, torch.nn.ModuleList()
    with LiveBytes() as live:
        losses = real.token_losses(ids[:, :-1], ids[:, 1:])
        kept = live.live
    del losses
    assert outer_memory(key, "cpu", "fp32", T).kept == pytest.approx(kept, rel=0.05)
    assert _model(key, "fp32").cfg == real.cfg


def test_full_study_fits_80gb_gpus_up_to_64k_and_names_the_context_degree_beyond():
    _, runs = load_study(ROOT / "config" / "config.yaml")
    trained = [s for s in runs.values() if "train" in s["stages"]]
    assert len(trained) == 60
    for spec in trained:
        plan, layout = spec["plan"], spec["layout"]
        assert plan["memory_gb"] <= plan["capacity_gb"] < 80, spec["run_id"]
        assert (
            layout["nodes"] * layout["tasks_per_node"]
            == spec["resources"]["train"]["gpu"] * (spec["resources"]["train"]["nodes"])
        )
        if spec["context"] <= 65536:
            assert plan["status"] == "fits" and layout["context"] == 1, spec["run_id"]
        else:
            assert layout["context"] >= 1
            assert (plan["status"] == "fits") == (layout["context"] == 1), spec["run_id"]
    assert {s["layout"]["nodes"] for s in trained if s["study"] == "scratch_4b"} == {8}


def test_plan_command_prints_every_run(capsys):
    assert main(["plan", str(ROOT / "config" / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "scratch/ttt_swa-1.5B-32k" in out and "needs context parallel, degree" in out
    assert "60 training runs: 52 fit as planned, 8 need context parallelism" in out


def test_auto_picks_the_least_recomputation_then_the_largest_micro_batch_that_fit(micro_raw):
    """demo at 4K, batch 4 on one CPU process (estimates: no checkpointing 1.38 / 0.87 /
    0.62 GB at micro-batches 4 / 2 / 1, full checkpointing 0.47 GB at 1)."""
    micro_raw["defaults"].update(size="demo", context=4096)
    micro_raw["defaults"]["train"]["micro_batch_size"] = "auto"

    def layout_with(mem_mb):
        micro_raw["defaults"]["resources"]["train"]["mem_mb"] = mem_mb
        spec = expand_runs(validate_config(micro_raw))["micro/full-demo-4k"]
        assert spec["plan"]["memory_gb"] <= mem_mb / 1000
        return spec["layout"]["activation_checkpointing"], spec["layout"]["micro_batch_size"]

    assert layout_with(100_000) == ("none", 4)
    assert layout_with(1_000) == ("none", 2)
    assert layout_with(520) == ("full", 1)


def test_oversized_run_fails_validation_naming_the_run_and_the_numbers(micro_raw):
    micro_raw["defaults"].update(size="8B", context=32768)
    micro_raw["defaults"]["resources"]["train"].update(gpu=1)
    with pytest.raises(ConfigError) as err:
        validate_config(micro_raw)
    message = str(err.value)
    assert "micro/full-8B-32k" in message and "do not fit" in message
    assert "GB of 73.6 GB per rank" in message and "resources.train" in message


def test_run_that_needs_context_parallelism_is_refused_before_submission(tmp_path, micro_data):
    spec = micro_spec(tmp_path, micro_data)
    spec["layout"]["context"] = 2
    spec["plan"] = {"detail": "at best ..."}
    with pytest.raises(LaunchError, match="context parallelism of degree 2"):
        launch_stage("train", spec)
    status = read_status(spec["run_dir"], "train")
    assert status["status"] == "failed" and "context parallelism" in status["reason"]
    assert not (tmp_path / "run" / "logs").exists()  # no job was asked for
