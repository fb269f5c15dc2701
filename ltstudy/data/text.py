"""Plain-text helpers shared by haystack and synthetic-data generators."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def split_sentences(texts: Sequence[str]) -> list[str]:
    """Sentences (ending in '. ') of some texts, whitespace collapsed, fragments dropped."""
    sentences = []
    for text in texts:
        for piece in text.replace("\n", " ").split(". "):
            piece = " ".join(piece.split())
            if len(piece) > 20:
                sentences.append(piece + ". ")
    return sentences


def vocabulary(texts: Sequence[str], limit: int = 5000) -> list[str]:
    """Lowercase alphabetic words of 4-10 letters, most frequent first."""
    counts = Counter(
        w for t in texts for w in t.lower().split() if w.isalpha() and 4 <= len(w) <= 10
    )
    return [w for w, _ in counts.most_common(limit)]
