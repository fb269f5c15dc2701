"""Passkey retrieval over a length x depth grid.

The model decodes greedily after each prompt; a trial is correct when the first integer it
writes equals the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ltstudy.data.tokenizer import get_tokenizer
from ltstudy.device import autocast, configure_threads, pick_device
from ltstudy.evaluate.passkey_prompt import depth_grid, first_integer, passkey_prompt
from ltstudy.results.schemas import identity, write_table
from ltstudy.train import load_trained


@torch.no_grad()
def greedy_decode(
    model: torch.nn.Module, prompt: list[int], max_new_tokens: int, dtype: str
) -> list[int]:
    """Greedy continuation (recomputes the full prefix each step; caches come with the zoo)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    out = []
    for _ in range(max_new_tokens):
        with autocast(device, dtype):
            logits = model(ids)[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return out


def evaluate_passkey(spec: Mapping[str, Any], out_path: str) -> None:
    cfg = spec["evaluate"]["passkey"]
    device = pick_device()
    configure_threads(spec["resources"]["evaluate"]["cpus_per_task"])
    model = load_trained(spec, device)
    tokenizer = get_tokenizer(spec["data"]["tokenizer"])
    rng = torch.Generator().manual_seed(cfg["seed"])
    rows = []
    for length in cfg["lengths"]:
        correct = 0
        for depth in depth_grid(cfg["depths"]):
            for trial in range(cfg["trials"]):
                key = int(torch.randint(1, 50001, (1,), generator=rng))
                prompt = passkey_prompt(tokenizer, length, depth, key)
                new = greedy_decode(model, prompt, cfg["max_new_tokens"], spec["train"]["dtype"])
                prediction = first_integer(tokenizer.decode(new))
                ok = prediction == str(key)
                correct += ok
                rows.append(
                    {
                        **identity(spec),
                        "length": length,
                        "depth": depth,
                        "trial": trial,
                        "passkey": str(key),
                        "prediction": prediction,
                        "correct": ok,
                    }
                )
        total = cfg["depths"] * cfg["trials"]
        print(
            f"[passkey {spec['run_id']}] length {length:,}: {correct}/{total} correct", flush=True
        )
    write_table("passkey", rows, out_path)
