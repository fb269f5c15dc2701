"""The variant registry: the rows of every results table.

A variant names a token mixer (by dotted path, so this module stays torch-free and Snakemake
parses fast), whether it uses the sliding window, whether the MLPs of some layers carry
In-Place TTT fast weights, and which `model.<block>` of the config holds its own settings.
Adding a mixer is one module exposing `Mixer(cfg, layer_idx)` with
`forward(x, rope, cache) -> y`, one entry here and, if it has settings, their defaults and
parameter count in `mixer_sizes.py`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    mixer: str  # "package.module:Class"; Class(cfg: ModelConfig, layer_idx: int) -> nn.Module
    windowed: bool  # uses the sliding window of the size preset / config
    ttt: bool  # In-Place TTT on the MLP of the selected layers
    settings: str | None  # name of its settings block under `model` (None: attention only)
    description: str

    @property
    def rotary(self) -> bool:
        """Whether positions enter through RoPE (so position extension methods apply)."""
        return self.settings in (None, "hybrid", "lact")


ATTENTION = "ltstudy.models.attention:Attention"

VARIANTS: dict[str, Variant] = {
    "full": Variant(ATTENTION, False, False, None, "causal softmax attention, RoPE, GQA"),
    "swa": Variant(ATTENTION, True, False, None, "sliding-window attention"),
    "hybrid": Variant(
        ATTENTION, True, False, "hybrid", "sliding-window layers with every k-th full"
    ),
    "gla": Variant(
        "ltstudy.models.gla:GatedLinearAttention", False, False, "gla", "gated linear attention"
    ),
    "deltanet": Variant(
        "ltstudy.models.deltanet:GatedDeltaNet", False, False, "deltanet", "gated DeltaNet"
    ),
    "mamba2": Variant("ltstudy.models.mamba2:Mamba2", False, False, "mamba2", "Mamba2 (SSD)"),
    "lact": Variant(
        "ltstudy.models.lact:LaCT",
        True,
        False,
        "lact",
        "large-chunk TTT with SwiGLU fast weights, alongside sliding-window attention",
    ),
    "ttt_full": Variant(
        ATTENTION, False, True, None, "In-Place TTT on the full-attention backbone"
    ),
    "ttt_swa": Variant(ATTENTION, True, True, None, "In-Place TTT on the sliding-window backbone"),
}
