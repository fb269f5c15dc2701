"""The paper's published RULER scores, to draw beside ours where a run matches their setting.

Source: In-Place Test-Time Training (arXiv 2604.06169, ICLR 2026), Tables 1-3, as transcribed in
/work/shared/reference/inplace-ttt.md section 4. Scores are RULER accuracy averaged over its 13
standard tasks (OpenCompass, 100 samples per task and length); lengths 4k = 4096 tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SOURCE = (
    "In-Place Test-Time Training (arXiv 2604.06169, ICLR 2026): RULER, mean over 13 tasks; "
    "Table 1 (Qwen3-4B-Base, continual training), Table 2 (LLaMA-3.1-8B, Qwen3-14B-Base), "
    "Table 3 (4B from scratch)"
)

K = 1024


@dataclass(frozen=True)
class PaperSetting:
    """One published table and the runs that match it: size, training context, and the
    pretrained checkpoint's name (None: trained from scratch)."""

    table: str
    size: str
    context: int
    pretrained: str | None
    scores: Mapping[str, Mapping[int, float]]  # variant -> length -> RULER score

    def matches(self, size: str, context: int, pretrained: str | None) -> bool:
        if size != self.size or context != self.context:
            return False
        if self.pretrained is None:
            return pretrained is None
        return pretrained is not None and self.pretrained in pretrained


def _lengths(*scores: float) -> dict[int, float]:
    return {4 * K * 2**i: s for i, s in enumerate(scores)}


SETTINGS = [
    PaperSetting(
        "Table 1: Qwen3-4B-Base, continual training to 128K (YaRN)",
        "4B",
        128 * K,
        "Qwen3-4B",
        {
            "full": _lengths(96.6, 94.1, 92.1, 88.7, 74.3, 74.8, 41.7),
            "ttt_full": _lengths(96.1, 95.6, 92.7, 89.3, 78.7, 77.0, 43.9),
        },
    ),
    PaperSetting(
        "Table 2: LLaMA-3.1-8B, continual training at 32K",
        "8B",
        32 * K,
        "Llama-3.1-8B",
        {
            "full": _lengths(93.9, 92.1, 92.5, 91.1, 81.6),
            "ttt_full": _lengths(94.4, 93.0, 93.3, 91.7, 83.7),
        },
    ),
    PaperSetting(
        "Table 2: Qwen3-14B-Base, continual training at 32K",
        "14B",
        32 * K,
        "Qwen3-14B",
        {
            "full": _lengths(96.8, 95.0, 94.6, 90.7, 67.9),
            "ttt_full": _lengths(97.2, 95.7, 95.2, 91.2, 70.6),
        },
    ),
    PaperSetting(
        "Table 3: 4B from scratch, 120B tokens at 8K",
        "4B",
        8 * K,
        None,
        {
            "full": _lengths(45.77, 38.09, 6.58),
            "ttt_full": _lengths(49.98, 43.82, 19.99),
            "swa": _lengths(14.77, 9.91, 5.07),
            "ttt_swa": _lengths(28.33, 26.80, 7.57),
        },
    ),
]


def paper_rows() -> list[dict[str, Any]]:
    """Every published score as a row: table, variant, length, score."""
    return [
        {"table": s.table, "variant": variant, "length": length, "score": score}
        for s in SETTINGS
        for variant, by_length in s.scores.items()
        for length, score in by_length.items()
    ]


def matching_setting(size: str, context: int, pretrained: str | None) -> PaperSetting | None:
    return next((s for s in SETTINGS if s.matches(size, context, pretrained)), None)
