"""Passkey retrieval over a length x depth grid.

The model decodes greedily after each prompt; a trial is correct when the first integer it
writes equals the key. Each row records the needle's distance from the end of the prompt, so
that accuracy can be read against a sliding window's reach.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ltstudy import progress
from ltstudy.data.tokenizer import get_tokenizer
from ltstudy.device import autocast
from ltstudy.evaluate.passkey_prompt import depth_grid, first_integer, passkey_prompt
from ltstudy.evaluate.setup import (
    Ranks,
    count_points,
    evaluation_ranks,
    position_methods,
    prefill_logits,
    trained_model,
)
from ltstudy.models.attention import reserve_kv_cache
from ltstudy.models.rope import scaling_label
from ltstudy.results.schemas import identity, write_table


@torch.no_grad()
def greedy_decode(
    model: torch.nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    dtype: str,
    eos_id: int | None = None,
    ranks: Ranks | None = None,
) -> list[int]:
    """Greedy continuation: one prefill of the prompt, then one token at a time via the cache,
    up to (not including) `eos_id`: what follows the end of a document is not an answer. Only
    the last position's logits are computed, and the cache is sized for the whole answer.
    With several ranks the prompt is split over them and every rank decodes the same tokens."""
    device = next(model.parameters()).device
    cache = model.new_cache()
    reserve_kv_cache(cache, len(prompt) + max_new_tokens)
    ids = torch.tensor([prompt], device=device)
    context = None if ranks is None else ranks.split(model, len(prompt))
    out = []
    for step in range(max_new_tokens):
        with autocast(device, dtype):
            if step == 0:
                logits = prefill_logits(model, ids, cache, context)[0]
            else:
                logits = model.logits_at(ids, -1, cache)[0, -1]
        token = int(logits.argmax())
        if token == eos_id:
            break
        out.append(token)
        ids = torch.tensor([[token]], device=device)
    return out


def evaluate_passkey(spec: Mapping[str, Any], out_path: str) -> None:
    with evaluation_ranks() as ranks:
        _evaluate_passkey(spec, out_path, ranks)


def _evaluate_passkey(spec: Mapping[str, Any], out_path: str, ranks: Ranks) -> None:
    cfg = spec["evaluate"]["passkey"]
    model = trained_model(spec, ranks)
    tokenizer = get_tokenizer(spec["data"]["tokenizer"])
    rng = torch.Generator().manual_seed(cfg["seed"])
    rows = []
    prompts = count_points(model, spec, cfg) * len(depth_grid(cfg["depths"])) * cfg["trials"]
    progress.update(0, prompts, "prompts")
    for length in cfg["lengths"]:
        trials = [
            (depth, trial, int(torch.randint(1, 50001, (1,), generator=rng)))
            for depth in depth_grid(cfg["depths"])
            for trial in range(cfg["trials"])
        ]
        for scaling in position_methods(model, spec, cfg, length):
            correct = 0
            for depth, trial, key in trials:
                prompt, distance = passkey_prompt(tokenizer, length, depth, key)
                new = greedy_decode(
                    model,
                    prompt,
                    cfg["max_new_tokens"],
                    spec["train"]["dtype"],
                    tokenizer.eos_id,
                    ranks,
                )
                prediction = first_integer(tokenizer.decode(new))
                correct += prediction == str(key)
                rows.append(
                    {
                        **identity(spec),
                        "length": length,
                        "rope": scaling_label(scaling),
                        "depth": depth,
                        "needle_distance": distance,
                        "trial": trial,
                        "passkey": str(key),
                        "prediction": prediction,
                        "correct": prediction == str(key),
                    }
                )
                progress.update(len(rows), prompts, "prompts")
            if ranks.is_main:
                print(
                    f"[passkey {spec['run_id']}] length {length:,} rope "
                    f"{scaling_label(scaling)}: {correct}/{len(trials)} correct",
                    flush=True,
                )
    if ranks.is_main:
        write_table("passkey", rows, out_path)
