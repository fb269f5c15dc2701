"""Loading Hugging Face checkpoints: tiny random Llama-3-style and Qwen3-style models are saved
as sharded safetensors, loaded with `ltstudy.models.from_pretrained`, and their logits are
checked against transformers' own forward pass; with TTT added the logits are unchanged."""

import json

import pytest
import torch

from ltstudy import models

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


@pytest.mark.parametrize("kind", ["llama", "llama_old_config", "qwen3"])
def test_logits_match_transformers(tmp_path, kind):
    reference = qwen3(tmp_path) if kind == "qwen3" else llama(tmp_path, kind == "llama_old_config")
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
        assert ours.cfg.rope_scaling["type"] == "llama3"

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
