"""Throughput's FLOP count (torchtitan/PaLM), the peak MFU divides by, and per-point memory."""

import polars as pl
import pytest
import torch
from torch import nn

from ltstudy.config import default_settings
from ltstudy.device import datasheet_peak_tflops
from ltstudy.evaluate.throughput import benchmark, device_peak
from ltstudy.models.flops import flops_per_token
from ltstudy.models.presets import resolve_model
from ltstudy.models.transformer import build_model


def model_cfg(variant: str, size: str, context: int, **changes) -> dict:
    return {**resolve_model(variant, size, default_settings()["model"], context=context), **changes}


def torchtitan_train_flops(model: nn.Module, seq_len: int) -> int:
    """torchtitan's get_dense_model_nparams_and_flops: 6·(N - embedding) + 12·l·h·q·t."""
    nparams = sum(p.numel() for p in model.parameters())
    embedding = sum(
        sum(p.numel() for p in m.parameters())
        for m in model.children()
        if isinstance(m, nn.Embedding)
    )
    cfg = model.cfg
    l, h, q, t = cfg.n_layers, cfg.n_heads, cfg.d_model // cfg.n_heads, seq_len
    return 6 * (nparams - embedding) + 12 * l * h * q * t


@pytest.mark.parametrize(("size", "context"), [("micro", 64), ("micro", 4096), ("500M", 32768)])
def test_train_flops_follow_torchtitan(size, context):
    model = build_model(model_cfg("full", size, context), seed=None, device="meta")
    assert not model.cfg.tie_embeddings  # torchtitan's Llama has its own output projection
    params = sum(p.numel() for p in model.parameters())
    expected = torchtitan_train_flops(model, context)
    assert flops_per_token(model.cfg.to_dict(), params, context, "train") == expected


def test_prefill_leaves_out_the_lm_head_and_decode_is_one_forward():
    context = 256
    model = build_model(model_cfg("full", "micro", context), seed=None, device="meta")
    cfg, params = model.cfg.to_dict(), sum(p.numel() for p in model.parameters())
    forward = torchtitan_train_flops(model, context) / 3
    head = 2 * model.lm_head.weight.numel()
    assert flops_per_token(cfg, params, context, "decode") == pytest.approx(forward)
    assert flops_per_token(cfg, params, context, "prefill") == pytest.approx(forward - head)


def test_a_sliding_window_layer_counts_its_window_of_keys():
    context = 1024
    full = build_model(model_cfg("full", "micro", context), seed=None, device="meta")
    swa = build_model(model_cfg("swa", "micro", context), seed=None, device="meta")
    cfg = swa.cfg
    params = sum(p.numel() for p in swa.parameters())
    # torchtitan's count with min(T, window) keys per query in place of T
    expected = torchtitan_train_flops(full, context) - 12 * cfg.n_layers * cfg.n_heads * (
        cfg.head_dim
    ) * (context - min(context, cfg.swa_window))
    assert flops_per_token(cfg.to_dict(), params, context, "train") == expected


def test_datasheet_peaks_by_device_name():
    assert datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert datasheet_peak_tflops("NVIDIA H100 PCIe") == 756
    assert datasheet_peak_tflops("NVIDIA H200") == 989
    assert datasheet_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert datasheet_peak_tflops("NVIDIA B200") == 2250
    assert datasheet_peak_tflops("NVIDIA L40S") == 362
    assert datasheet_peak_tflops("Some Future GPU") is None


def test_peak_is_given_or_measured_on_the_cpu():
    cpu = torch.device("cpu")
    assert device_peak(cpu, "fp32", 12.5) == (12.5, "given")
    peak, source = device_peak(cpu, "fp32")
    assert source == "measured" and peak > 0


def point_spec(context: int, mode: str, dtype: str = "fp32", peak: float | None = 1.0) -> dict:
    return {
        "run_id": f"t/full-micro-{context}",
        "study": "t",
        "variant": "full",
        "size": "micro",
        "context": context,
        "seed": 0,
        "model": model_cfg("full", "micro", context),
        "train": {"dtype": dtype},
        "evaluate": {
            "throughput": {
                "contexts": [context],
                "modes": [mode],
                "batch_size": 1,
                "warmup": 0,
                "repeats": 1,
                "decode_tokens": 2,
                "peak_tflops": peak,
            }
        },
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's resident set")
def test_cpu_peak_memory_is_each_points_own():
    """Measured large-then-small, the small point must not inherit the large one's peak."""
    frame = pl.DataFrame(benchmark([point_spec(4096, "train"), point_spec(64, "train")]))
    large, small = frame["peak_memory_mb"].to_list()
    assert frame["seq_len"].to_list() == [4096, 64] and (frame["status"] == "ok").all()
    assert small < large - 10
    assert (frame["memory_kind"] == "cpu_peak_rss").all()
    assert (frame["peak_source"] == "given").all() and (frame["peak_tflops"] == 1.0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_is_each_points_own_and_the_peak_is_the_datasheets():
    frame = pl.DataFrame(
        benchmark([point_spec(8192, "train", "bf16", None), point_spec(64, "train", "bf16", None)])
    )
    large, small = frame["peak_memory_mb"].to_list()
    assert small < large and (frame["memory_kind"] == "cuda_max_allocated").all()
    datasheet = datasheet_peak_tflops(torch.cuda.get_device_name())
    if datasheet:
        assert (frame["peak_source"] == "datasheet").all()
        assert (frame["peak_tflops"] == datasheet).all()


def test_throughput_command_keeps_the_committed_table(tmp_path, capsys):
    """`ltstudy throughput` writes a new, dated table and reports the spread of its repeats;
    only `--replace` writes the committed throughput-<device> table."""
    from ltstudy.cli import main

    args = ["throughput", "--variants", "full", "--sizes", "micro", "--contexts", "64"]
    args += ["--modes", "prefill", "--repeats", "3", "--out", str(tmp_path)]
    assert main(args) == 0
    (dated,) = tmp_path.glob("throughput-cpu-*.parquet")
    assert not (tmp_path / "throughput-cpu.parquet").exists()
    row = pl.read_parquet(dated).row(0, named=True)
    assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
    assert "spread %" in capsys.readouterr().out
    assert main([*args, "--replace"]) == 0
    assert (tmp_path / "throughput-cpu.parquet").exists()
    assert (tmp_path / "throughput-cpu.md").read_text().count("full") == 1


def test_throughput_command_measures_each_kernels_setting(tmp_path):
    from ltstudy.cli import main

    args = ["throughput", "--variants", "ttt_full", "--sizes", "micro", "--contexts", "64"]
    args += ["--modes", "prefill", "--repeats", "1", "--kernels", "auto", "reference"]
    assert main([*args, "--out", str(tmp_path), "--replace"]) == 0
    rows = pl.read_parquet(tmp_path / "throughput-cpu.parquet")
    assert rows["kernels"].to_list() == ["auto", "reference"]
    assert (rows["status"] == "ok").all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's table")
def test_ops_command_times_the_reference_and_says_why_the_fast_paths_are_not(tmp_path, capsys):
    """On the CPU each op's torch reference is timed; the fast paths need a GPU, and the table
    says so."""
    from ltstudy.cli import main

    args = ["ops", "--variants", "swa", "gla", "ttt_full", "--sizes", "micro", "--contexts", "64"]
    assert main([*args, "--repeats", "1", "--out", str(tmp_path), "--replace"]) == 0
    rows = pl.read_parquet(tmp_path / "ops-cpu.parquet")
    assert rows["op"].to_list() == ["swa", "swa", "gla", "gla", "in-place ttt", "in-place ttt"]
    assert (rows["reference_ms"] > 0).all() and rows["fast_ms"].is_null().all()
    assert "no CUDA GPU" in (tmp_path / "ops-cpu.md").read_text()
    assert "no CUDA GPU" in capsys.readouterr().out
