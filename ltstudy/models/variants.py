"""The variant registry: the rows of every results table.

A variant names a token mixer (by dotted path, so this module stays torch-free and Snakemake
parses fast) and whether the MLPs of some layers carry In-Place TTT fast weights. Adding a
mixer is one module exposing `Mixer(cfg, layer_idx)` plus one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    mixer: str  # "package.module:Class"; Class(cfg: ModelConfig, layer_idx: int) -> nn.Module
    windowed: bool  # uses the sliding window of the size preset / config
    ttt: bool  # In-Place TTT on the MLP of the selected layers
    description: str


ATTENTION = "ltstudy.models.attention:Attention"

VARIANTS: dict[str, Variant] = {
    "full": Variant(ATTENTION, False, False, "causal softmax attention, RoPE, GQA"),
    "swa": Variant(ATTENTION, True, False, "sliding-window attention"),
    "ttt_full": Variant(ATTENTION, False, True, "In-Place TTT on the full-attention backbone"),
    "ttt_swa": Variant(ATTENTION, True, True, "In-Place TTT on the sliding-window backbone"),
}
