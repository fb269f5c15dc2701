"""The census's counts, kept on disk between processes and read without importing torch.

Snakemake parses the workflow, and so plans every run, in its own process and again in each
job's; importing torch for that cost a second and 200 MB per process. The counts (and the
few facts the planner takes from the model code) are keyed by the code that produces them:
census.py, the model and op sources and torch's version. Only what is missing is counted,
by census.py on the meta device.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ltstudy.io import atomic_path


@dataclass(frozen=True)
class PieceMemory:
    """Bytes one piece of the model needs at one token count (batch of one sequence).

    kept:         alive after its forward, kept for the backward (its output included)
    forward_peak: above `kept`, the most its forward holds at once
    backward_peak: above everything alive when its backward starts, the most it adds
    inference:    the most its forward holds at once without gradients (output included)
    """

    kept: int
    forward_peak: int
    backward_peak: int
    inference: int


class _DiskCache:
    """JSON values that survive the process, in one file per version of the counting code."""

    def __init__(self) -> None:
        self._entries: dict[str, Any] | None = None
        self._dirty = False

    @functools.cached_property
    def path(self) -> Path:
        sources = Path(__file__).resolve().parents[1]
        digest = hashlib.sha256(importlib.metadata.version("torch").encode())
        for folder in ("models", "ops"):
            for file in sorted((sources / folder).glob("*.py")):
                digest.update(file.read_bytes())
        digest.update(Path(__file__).with_name("census.py").read_bytes())
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ltstudy"
        return root / f"census-{digest.hexdigest()[:16]}.json"

    def _load(self) -> dict[str, Any]:
        if self._entries is None:
            try:
                self._entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        """The JSON value stored under `key`, computed and stored if missing."""
        entries = self._load()
        if key not in entries:
            entries[key] = compute()
            if not self._dirty:
                atexit.register(self.save)
            self._dirty = True
        return entries[key]

    def save(self) -> None:
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read_current(), **(self._entries or {})}
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(merged))
            self._dirty = False
        except OSError:  # a read-only home: the counts are only slower next time
            pass

    def _read_current(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}


CACHE = _DiskCache()


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def block_memory(model_json: str, device: str, dtype: str, layer: int, tokens: int) -> PieceMemory:
    """One block at `tokens` tokens (one sequence) as it runs on `device` (cpu | cuda);
    inputs are kept outside the count."""

    def count() -> list[int]:
        from ltstudy.plan.census import _block_memory

        return list(vars(_block_memory(model_json, device, dtype, layer, tokens)).values())

    return PieceMemory(
        *CACHE.get(cache_key("block", model_json, device, dtype, layer, tokens), count)
    )


def outer_memory(model_json: str, device: str, dtype: str, tokens: int) -> PieceMemory:
    """Everything but the blocks: embeddings, final norm, LM head and the chunked loss."""

    def count() -> list[int]:
        from ltstudy.plan.census import _outer_memory

        return list(vars(_outer_memory(model_json, device, dtype, tokens)).values())

    return PieceMemory(*CACHE.get(cache_key("outer", model_json, device, dtype, tokens), count))


@dataclass(frozen=True)
class CacheMemory:
    """Bytes one layer's decode cache holds after a prefill (batch of one sequence).

    keys_values: its attention keys and values (the tensors' own sizes)
    states:      everything else it holds: recurrent states, fast weights, conv tails
    retained:    the storages all its tensors keep alive (buffers reserved ahead included)
    """

    keys_values: int
    states: int
    retained: int


def cache_memory(model_json: str, dtype: str, layer: int, tokens: int) -> CacheMemory:
    """One block's decode cache after a prefill of `tokens` tokens (one sequence); the same on
    every device."""

    def count() -> list[int]:
        from ltstudy.plan.census import _cache_memory

        return list(vars(_cache_memory(model_json, dtype, layer, tokens)).values())

    return CacheMemory(*CACHE.get(cache_key("cache", model_json, dtype, layer, tokens), count))


def block_kinds(model_cfg: Mapping[str, Any]) -> dict[tuple, list[int]]:
    """census.block_kinds (layers grouped by what they allocate), from the cache."""

    def count() -> list[list]:
        from ltstudy.plan.census import block_kinds

        return [[*kind, layers] for kind, layers in block_kinds(model_cfg).items()]

    kinds = CACHE.get(cache_key("kinds", json.dumps(model_cfg, sort_keys=True)), count)
    return {(window, ttt): layers for window, ttt, layers in kinds}


def loss_chunk(vocab_size: int) -> int:
    """Tokens per chunk of the loss head (ltstudy.models.transformer.loss_chunk)."""

    def count() -> int:
        from ltstudy.models.transformer import loss_chunk

        return loss_chunk(vocab_size)

    return CACHE.get(cache_key("loss_chunk", vocab_size), count)
