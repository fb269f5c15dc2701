"""The continual-training path: a study starts from a local Hugging Face checkpoint (tokenized
with the checkpoint's own tokenizer), and a second stage continues from the first with YaRN."""

import polars as pl
import pytest
import torch

from ltstudy import models
from ltstudy.config import expand_runs, validate_config
from ltstudy.data.dataset import TokenData, build_dataset
from ltstudy.train import run_paths, train
from tests.conftest import TINY_QWEN3

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen3 checkpoint with a byte-level BPE tokenizer of its own."""
    path = tmp_path_factory.mktemp("Qwen3-tiny")
    from ltstudy.data.corpus import embedded_documents

    texts = [doc.text for _, doc in zip(range(30), embedded_documents(), strict=False)]
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=300, special_tokens=["<|endoftext|>"])
    tok.save(str(path / "tokenizer.json"))
    config = transformers.Qwen3Config(**TINY_QWEN3, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def continual_config(micro_raw, checkpoint):
    micro_raw["studies"] = [
        {
            "name": "continual",
            "data": {"tokenizer": str(checkpoint)},
            "overrides": {
                "size": "tiny_qwen3",
                "context": 64,
                "model": {"pretrained": str(checkpoint), "ttt": {"chunk_size": 16, "every": 1}},
                "train": {"steps": 6, "lr": 1e-3, "checkpoint_every": 100},
            },
            "grid": {"variant": ["full", "ttt_full"]},
            "runs": [
                {"name": "stage1"},
                {
                    "name": "stage2",
                    "overrides": {
                        "context": 128,
                        "model": {
                            "rope_scaling": {"type": "yarn", "factor": 2.0, "original_context": 64}
                        },
                        "train": {"init_from": "continual/{variant}-tiny_qwen3-64-stage1"},
                    },
                },
            ],
        }
    ]
    return expand_runs(validate_config(micro_raw))


def test_stages_start_from_the_checkpoint_then_from_stage_one(micro_raw, checkpoint, tmp_path):
    runs = continual_config(micro_raw, checkpoint)
    assert list(runs) == [
        "continual/full-tiny_qwen3-64-stage1",
        "continual/full-tiny_qwen3-128-stage2",
        "continual/ttt_full-tiny_qwen3-64-stage1",
        "continual/ttt_full-tiny_qwen3-128-stage2",
    ]
    stage1, stage2 = (
        runs["continual/ttt_full-tiny_qwen3-64-stage1"],
        runs["continual/ttt_full-tiny_qwen3-128-stage2"],
    )
    assert stage1["model"]["vocab_size"] == 300 and stage1["model"]["qk_norm"]
    assert stage2["model"]["rope_scaling"]["type"] == "yarn"
    assert stage2["init_from_dir"] == stage1["run_dir"]

    data_dir = tmp_path / "data"
    build_dataset(stage1["data"], data_dir)
    for spec in (stage1, stage2):
        spec["run_dir"] = str(tmp_path / spec["name"])
        spec["data_dir"] = str(data_dir)
    stage2["init_from_dir"] = stage1["run_dir"]

    base = models.from_pretrained(checkpoint)
    first = train(stage1)
    curve = pl.read_parquet(run_paths(stage1)["curve"])
    # step 1's loss is the checkpoint's own loss on that batch (TTT starts as an identity)
    batch = TokenData.load(data_dir, "train").sample(
        stage1["train"]["batch_size"], 65, stage1["seed"], 0
    )
    with torch.no_grad():
        expected = base.token_losses(batch[:, :-1], batch[:, 1:]).mean().item()
    assert curve["loss"][0] == pytest.approx(expected, rel=1e-5)
    second = train(stage2)
    assert second["steps"] == 6 and first["final_loss"] > 0
    logs = pl.read_parquet(run_paths(stage2)["curve"])
    assert logs["loss"][0] < curve["loss"][0]  # stage 2 starts from trained weights


def test_missing_checkpoint_is_named(micro_raw, tmp_path):
    from ltstudy.config import ConfigError

    with pytest.raises(ConfigError, match="no-such-checkpoint"):
        continual_config(micro_raw, tmp_path / "no-such-checkpoint")
