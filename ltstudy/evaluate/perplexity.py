"""Sliding-window perplexity (the stride method of Hugging Face's perplexity guide).

Windows of `length` tokens move by `stride`; each window scores only the tokens that earlier
windows did not (the overlap is labelled -100), so every token is scored once, with up to
length - stride tokens of context. Perplexity is exp of the mean NLL over scored tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ltstudy.data.dataset import TokenData
from ltstudy.device import autocast, configure_threads, pick_device
from ltstudy.models.rope import scaling_label, scalings_for_length
from ltstudy.results.schemas import identity, write_table
from ltstudy.train import load_trained


@torch.no_grad()
def sliding_window_nll(
    model: torch.nn.Module, tokens: Tensor, length: int, stride: int, dtype: str = "bf16"
) -> tuple[float, int, int]:
    """(summed NLL, scored tokens, windows) over a 1-D token tensor."""
    device = next(model.parameters()).device
    n = tokens.numel()
    nll_sum, scored, windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, n - 1, stride):
        end = min(begin + length, n - 1)
        window = tokens[begin : end + 1].to(device)[None]
        labels = window[:, 1:].clone()
        fresh = end - prev_end  # tokens not scored by an earlier window
        labels[:, : labels.shape[1] - fresh] = -100
        with autocast(device, dtype):
            losses = model.token_losses(window[:, :-1], labels)
        nll_sum += float(losses.sum())
        scored += fresh
        windows += 1
        prev_end = end
        if end == n - 1:
            break
    return nll_sum, scored, windows


def evaluate_perplexity(spec: Mapping[str, Any], out_path: str) -> None:
    cfg = spec["evaluate"]["perplexity"]
    device = pick_device()
    configure_threads(spec["resources"]["evaluate"]["cpus_per_task"])
    model = load_trained(spec, device)
    data = TokenData.load(spec["data_dir"], "validation")
    rows = []
    for length in cfg["lengths"]:
        if data.n_tokens < length + 1:
            raise ValueError(
                f"{spec['run_id']}: the validation split has {data.n_tokens:,} tokens, fewer than "
                f"evaluation length {length:,}; lower evaluate.perplexity.lengths or use more data"
            )
        tokens = data.head(max(cfg["max_tokens"], length + 1))
        stride = cfg["stride"] or max(1, length // 2)
        for scaling in scalings_for_length(
            model.cfg.rope_scaling, cfg["rope_scaling_beyond_context"], spec["context"], length
        ):
            model.set_rope_scaling(scaling)
            nll, scored, windows = sliding_window_nll(
                model, tokens, length, stride, spec["train"]["dtype"]
            )
            mean = nll / scored
            rows.append(
                {
                    **identity(spec),
                    "length": length,
                    "rope": scaling_label(scaling),
                    "stride": stride,
                    "windows": windows,
                    "tokens_scored": scored,
                    "nll": mean,
                    "ppl": math.exp(mean),
                }
            )
            print(
                f"[perplexity {spec['run_id']}] length {length:,} stride {stride:,} "
                f"rope {scaling_label(scaling)}: ppl {math.exp(mean):.3f} over {scored:,} tokens",
                flush=True,
            )
    write_table("perplexity", rows, out_path)
