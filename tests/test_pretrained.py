"""Loading Hugging Face checkpoints: tiny random Llama-3-style and Qwen3-style models are saved
as sharded safetensors, loaded with `ltstudy.models.from_pretrained`, and their logits are
checked against transformers' own forward pass; with TTT added the logits are unchanged."""

import json
import re

import pytest
import torch

from ltstudy import models
from ltstudy.models.pretrained import hf_name, read_config

transformers = pytest.importorskip("transformers")

COMMON = {
    "vocab_size": 97,
    "hidden_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "intermediate_size": 80,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}


def save(tmp_path, model) -> None:
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()  # really sharded


def llama(tmp_path, old_style: bool):
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    config = transformers.LlamaConfig(**COMMON, rope_theta=50000.0, rope_scaling=rope)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    save(tmp_path, model)
    if old_style:  # the config.json layout of the released Llama-3.1 checkpoints
        data = json.loads((tmp_path / "config.json").read_text())
        data.pop("rope_parameters", None)
        data.update(rope_theta=50000.0, rope_scaling=rope)
        (tmp_path / "config.json").write_text(json.dumps(data))
    return model


def llama_dynamic(tmp_path):
    """Dynamic NTK past max_position_embeddings (64); transformers ignores the nested 32."""
    rope = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 32}
    config = transformers.LlamaConfig(
        **{**COMMON, "max_position_embeddings": 64}, rope_theta=10000.0, rope_scaling=rope
    )
    torch.manual_seed(4)
    model = transformers.LlamaForCausalLM(config).eval()
    save(tmp_path, model)
    return model


def qwen3(tmp_path):
    config = transformers.Qwen3Config(
        **COMMON, head_dim=16, tie_word_embeddings=True, rope_theta=1e6
    )
    torch.manual_seed(1)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # QK-norm weights start at 1: make them matter
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.uniform_(0.5, 1.5)
    save(tmp_path, model)
    return model


@pytest.mark.parametrize("kind", ["llama", "llama_old_config", "llama_dynamic", "qwen3"])
def test_logits_match_transformers(tmp_path, kind):
    if kind == "llama_dynamic":
        reference = llama_dynamic(tmp_path)
    elif kind == "qwen3":
        reference = qwen3(tmp_path)
    else:
        reference = llama(tmp_path, kind == "llama_old_config")
    ours = models.from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 150), generator=torch.Generator().manual_seed(2))  # > 32: scaled
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    assert got.shape == (2, 150, 97)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if kind == "qwen3":
        assert ours.cfg.qk_norm and ours.cfg.tie_embeddings
    else:
        assert ours.cfg.rope_scaling["type"] == ("dynamic" if kind == "llama_dynamic" else "llama3")

    with_ttt = models.from_pretrained(tmp_path, ttt={"chunk_size": 32, "every": 1})
    assert sum(".ttt_" in n for n, _ in with_ttt.named_parameters()) == 2 * 3
    with torch.no_grad():
        assert torch.equal(with_ttt(ids), got)


def test_unsupported_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        models.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        models.from_pretrained(tmp_path)


# ---- config fields: what transformers computes, or a named failure ----------------------------

# config.json of the released Llama-3.1-8B and Qwen3-8B checkpoints (values as published)
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def write_config(folder, config):
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


@pytest.mark.parametrize("base", ["llama", "qwen3"])
def test_released_configs_are_accepted(tmp_path, base):
    write_config(tmp_path, LLAMA31_8B if base == "llama" else QWEN3_8B)
    assert read_config(tmp_path)["model_type"] == base
    # the layout transformers 5 writes (rope_parameters, dtype, layer_types) too
    config = (transformers.LlamaConfig if base == "llama" else transformers.Qwen3Config)(**COMMON)
    config.save_pretrained(tmp_path)
    read_config(tmp_path)


@pytest.mark.parametrize(
    ("base", "change", "field"),
    [
        ("llama", {"hidden_act": "gelu"}, "hidden_act"),
        ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        (
            "llama",
            {
                "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5},
            },
            "rope_parameters.partial_rotary_factor",
        ),
        ("llama", {"rope_scaling": {**YARN, "truncate": False}}, "rope_scaling.truncate"),
        ("llama", {"rope_scaling": {**YARN, "foo": 1.0}}, "rope_scaling.foo"),
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "longrope",
                    "short_factor": [1.0],
                    "long_factor": [2.0],
                }
            },
            "rope_scaling.rope_type",
        ),
        ("llama", {"attention_bias": True}, "attention_bias"),
        ("llama", {"mlp_bias": True}, "mlp_bias"),
        ("llama", {"attention_dropout": 0.1}, "attention_dropout"),
        ("llama", {"head_dim": 127}, "head_dim"),
        ("llama", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ("llama", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
        ("qwen3", {"layer_types": ["full_attention"] * 35 + ["sliding_attention"]}, "layer_types"),
        ("qwen3", {"mlp_bias": True}, "mlp_bias"),  # not a Qwen3 field: transformers ignores it
    ],
)
def test_unsupported_config_fields_are_named(tmp_path, base, change, field):
    released = LLAMA31_8B if base == "llama" else QWEN3_8B
    file = write_config(tmp_path, {**released, **change})
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))}: .*`{re.escape(field)}`"):
        read_config(tmp_path)


def hf_rope(folder, config, seq_len):
    """transformers' own inverse frequencies and attention factor for a config.json."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    write_config(folder, config)
    loaded = transformers.AutoConfig.from_pretrained(folder)
    return ROPE_INIT_FUNCTIONS[loaded.rope_parameters["rope_type"]](loaded, "cpu", seq_len=seq_len)


ROPE_CASES = {
    # transformers grows the base past max_position_embeddings; the nested field is ignored
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn_mscale": {
        **YARN,
        "original_max_position_embeddings": 32,
        "mscale": 1.0,
        "mscale_all_dim": 0.8,
    },
    "yarn_no_factor": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 32},
    "yarn_betas": {
        **YARN,
        "original_max_position_embeddings": 32,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "attention_factor": 1.3,
    },
    "llama3_top_level_original": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
@pytest.mark.parametrize("seq_len", [None, 40, 128, 129, 1000])
def test_rope_scalings_match_transformers(tmp_path, case, seq_len):
    from ltstudy.models.hf_config import model_config
    from ltstudy.models.rope import rope_frequencies

    config = {
        **COMMON,
        "model_type": "llama",
        "max_position_embeddings": 128,
        "rope_theta": 50000.0,
        "rope_scaling": ROPE_CASES[case],
    }
    if case == "llama3_top_level_original":  # Phi-3 style: transformers prefers this one
        config["original_max_position_embeddings"] = 16
    expected_freq, expected_factor = hf_rope(tmp_path, config, seq_len)
    ours = model_config(config)
    freq, factor = rope_frequencies(
        ours["head_dim"], ours["rope_base"], ours["rope_scaling"], seq_len
    )
    torch.testing.assert_close(freq, expected_freq)
    assert factor == pytest.approx(expected_factor, rel=1e-12)


# ---- loading in the target dtype ------------------------------------------------------------


def allocation_peak(fn):
    """(fn(), peak bytes of CPU memory allocated meanwhile): torch's allocations and the
    safetensors memory maps, as the profiler records them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    now = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        now += event.self_cpu_memory_usage
        peak = max(peak, now)
    return out, peak


def test_loads_in_the_target_dtype_without_a_float32_copy(tmp_path):
    config = transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": 16})
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, max_shard_size="40KB")
    from safetensors.torch import load_file

    files = sorted(tmp_path.glob("*.safetensors"))
    stored = {k: v for f in files for k, v in load_file(f).items()}
    assert all(v.dtype == torch.float32 for v in stored.values())
    weights = sum(v.numel() for v in stored.values()) * 2  # bytes in bf16
    largest_shard = max(f.stat().st_size for f in files)

    model, peak = allocation_peak(lambda: models.from_pretrained(tmp_path, dtype=torch.bfloat16))
    # one bf16 copy, and at most two shards mapped at once (a float32 model alone is 2x)
    assert peak <= weights + 2 * largest_shard
    assert 2 * largest_shard < 0.5 * weights
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16
        assert torch.equal(param, stored[hf_name(name)].to(torch.bfloat16))
