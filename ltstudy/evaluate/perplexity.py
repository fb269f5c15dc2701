"""Perplexity by three protocols, at each evaluation length and position method.

Every protocol reads windows of `length` tokens, so at length = context no position lies beyond
the training context; a window's first token has no context, so it is never scored.

stride       Hugging Face's sliding window: windows of `length` tokens move by `stride`
             (<= length); each scores only tokens no earlier window scored (the overlap is
             labelled -100), so every token counts once, after at least length - stride
             tokens of its window (fewer in the first window; a token that opens a window
             with nothing before it is not scored); perplexity = exp(NLL / scored tokens).
final_block  The In-Place TTT paper's protocol: the perplexity of a fixed final block of each
             long validation document as the context before it grows: the window is the
             document's last `length` tokens, `block` of them scored after length - block
             tokens of context.
by_position  Loss by token position: mean NLL per position bucket over the first `length`
             tokens of long validation documents (recurrent models are judged this way).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import polars as pl
import torch
from torch import Tensor

from ltstudy import progress
from ltstudy.data.dataset import TokenData
from ltstudy.device import autocast
from ltstudy.evaluate.setup import (
    Ranks,
    count_points,
    evaluation_ranks,
    position_methods,
    sequence_losses,
    trained_model,
)
from ltstudy.models.rope import scaling_label
from ltstudy.results.schemas import identity, write_table


def _losses(
    model: torch.nn.Module, window: Tensor, labels: Tensor, dtype: str, ranks: Ranks | None
) -> Tensor:
    """Per-token losses of one window, split over the job's ranks when it has several."""
    device = next(model.parameters()).device
    ids, labels = window[None, :-1].to(device), labels[None].to(device)
    context = None if ranks is None else ranks.split(model, ids.shape[1])
    with torch.no_grad(), autocast(device, dtype):
        return sequence_losses(model, ids, labels, context)[0].float()


def sliding_window_nll(
    model: torch.nn.Module,
    tokens: Tensor,
    length: int,
    stride: int,
    dtype: str = "bf16",
    ranks: Ranks | None = None,
) -> tuple[float, int, int]:
    """(summed NLL, scored tokens, windows) over a 1-D token tensor."""
    if not 1 <= stride <= length:
        raise ValueError(
            f"sliding window: stride {stride} must be between 1 and the window length {length} "
            "(a longer stride would leave tokens between windows unscored)"
        )
    n = tokens.numel()
    nll_sum, scored, windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + length, n)
        first = max(prev_end, begin + 1)  # earlier windows scored the tokens before it
        if end > first:
            window = tokens[begin:end]
            labels = window[1:].clone()
            labels[: first - begin - 1] = -100
            nll_sum += float(_losses(model, window, labels, dtype, ranks).sum())
            scored, windows = scored + end - first, windows + 1
        prev_end = end
        if end == n:
            break
    return nll_sum, scored, windows


def final_block_nll(
    model: torch.nn.Module,
    documents: list[Tensor],
    length: int,
    block: int,
    dtype: str = "bf16",
    ranks: Ranks | None = None,
) -> tuple[float, int, int]:
    """(summed NLL, scored tokens, documents) of each document's last `block` tokens, read in a
    window of the document's last `length` tokens (length - block tokens of context)."""
    if not 1 <= block < length:
        raise ValueError(
            f"final block: `evaluate.perplexity.block` ({block}) must be shorter than the "
            f"window length {length}"
        )
    nll_sum, scored = 0.0, 0
    for doc in documents:
        if doc.numel() < length:
            raise ValueError(f"final block: a document of {doc.numel()} tokens < length {length}")
        window = doc[doc.numel() - length :]
        labels = window[1:].clone()
        labels[: length - 1 - block] = -100
        nll_sum += float(_losses(model, window, labels, dtype, ranks).sum())
        scored += block
    return nll_sum, scored, len(documents)


def loss_by_position(
    model: torch.nn.Module,
    documents: list[Tensor],
    length: int,
    buckets: int,
    dtype: str = "bf16",
    ranks: Ranks | None = None,
) -> list[dict[str, Any]]:
    """Mean NLL per bucket of token positions over the first `length` tokens of documents."""
    total = torch.zeros(length)
    for doc in documents:
        window = doc[: length + 1]
        total += _losses(model, window, window[1:], dtype, ranks).cpu()
    mean = total / len(documents)
    edges = [round(i * length / buckets) for i in range(buckets + 1)]
    return [
        {
            "bucket_start": lo,
            "bucket_end": hi,
            "tokens": (hi - lo) * len(documents),
            "nll": float(mean[lo:hi].mean()),
        }
        for lo, hi in itertools.pairwise(edges)
        if hi > lo
    ]


def long_documents(data_dir: str, min_tokens: int, limit: int) -> list[Tensor]:
    """Up to `limit` validation documents with at least `min_tokens` tokens (longest first)."""
    docs = (
        pl.read_parquet(f"{data_dir}/documents.parquet")
        .filter((pl.col("split") == "validation") & (pl.col("tokens") - 1 >= min_tokens))
        .sort("tokens", descending=True)
        .head(limit)
    )
    shards = TokenData.load(data_dir, "validation").shards
    return [
        torch.from_numpy(
            shards[r["shard"]][r["offset"] : r["offset"] + r["tokens"] - 1].astype("int64")
        )
        for r in docs.iter_rows(named=True)
    ]


def evaluate_perplexity(spec: Mapping[str, Any], out_paths: Mapping[str, str]) -> None:
    with evaluation_ranks() as ranks:
        _evaluate_perplexity(spec, out_paths, ranks)


def _evaluate_perplexity(
    spec: Mapping[str, Any], out_paths: Mapping[str, str], ranks: Ranks
) -> None:
    cfg = spec["evaluate"]["perplexity"]
    model = trained_model(spec, ranks)
    data = TokenData.load(spec["data_dir"], "validation")
    dtype, tag = spec["train"]["dtype"], spec["run_id"]
    rows, positions = [], []

    def record(
        protocol: str,
        length: int,
        scaling,
        nll: float,
        scored: int,
        windows: int,
        stride: int | None = None,
        block: int | None = None,
    ) -> None:
        mean = nll / scored
        rows.append(
            {
                **identity(spec),
                "protocol": protocol,
                "length": length,
                "rope": scaling_label(scaling),
                "stride": stride,
                "block": block,
                "window_context": length - (stride or block),
                "windows": windows,
                "tokens_scored": scored,
                "nll": mean,
                "ppl": math.exp(mean),
            }
        )
        say(
            f"{protocol} length {length:,} rope {scaling_label(scaling)}: "
            f"ppl {math.exp(mean):.3f} over {scored:,} tokens"
        )

    def say(message: str) -> None:
        if ranks.is_main:
            print(f"[perplexity {tag}] {message}", flush=True)

    points, done = count_points(model, spec, cfg), 0
    progress.update(done, points, "points")
    for length in cfg["lengths"]:
        stride = cfg["stride"] or max(1, length // 2)
        if "stride" in cfg["protocols"]:
            if data.n_tokens < length + 1:
                raise ValueError(
                    f"{tag}: the validation split has {data.n_tokens:,} tokens, fewer than "
                    f"evaluation length {length:,}; lower evaluate.perplexity.lengths or use "
                    "more data"
                )
            tokens = data.head(max(cfg["max_tokens"], length + 1))
        docs = long_documents(spec["data_dir"], length + 1, cfg["documents"])  # by_position
        if not docs and {"final_block", "by_position"} & set(cfg["protocols"]):
            say(
                f"no validation document has {length + 1:,} tokens: "
                "final_block and by_position skipped at this length"
            )
        final_block = "final_block" in cfg["protocols"] and docs and cfg["block"] < length
        if "final_block" in cfg["protocols"] and cfg["block"] >= length:
            say(
                f"final_block skipped at length {length:,}: the window "
                f"holds no context before a block of {cfg['block']:,} tokens"
            )
        for scaling in position_methods(model, spec, cfg, length):
            if "stride" in cfg["protocols"]:
                record(
                    "stride",
                    length,
                    scaling,
                    *sliding_window_nll(model, tokens, length, stride, dtype, ranks),
                    stride=stride,
                )
            if final_block:
                record(
                    "final_block",
                    length,
                    scaling,
                    *final_block_nll(model, docs, length, cfg["block"], dtype, ranks),
                    block=cfg["block"],
                )
            if "by_position" in cfg["protocols"] and docs:
                by_position = loss_by_position(model, docs, length, cfg["buckets"], dtype, ranks)
                for row in by_position:
                    positions.append(
                        {**identity(spec), "length": length, "rope": scaling_label(scaling), **row}
                    )
            done += 1
            progress.update(done, points, "points")
    if ranks.is_main:
        write_table("perplexity", rows, out_paths["table"])
        write_table("position_loss", positions, out_paths["positions"])
