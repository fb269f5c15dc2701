"""What each stage does inside its job process. Heavy imports happen here, not in Snakemake."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Stages whose every rank shares the work (training; evaluations that split each sequence over
# the job's ranks); in a job with several ranks the others run on the first (StageJob).
SPLIT = {"train", "perplexity", "passkey", "ruler"}


def run_stage(stage: str, payload: Mapping[str, Any], outputs: Mapping[str, str]) -> Any:
    if stage == "data":
        from ltstudy.data.dataset import build_dataset

        return build_dataset(payload["data"], payload["data_dir"])["documents"]
    if stage == "train":
        from ltstudy.train import train

        return train(payload)
    if stage == "perplexity":
        from ltstudy.evaluate.perplexity import evaluate_perplexity

        return evaluate_perplexity(payload, outputs)
    if stage == "passkey":
        from ltstudy.evaluate.passkey import evaluate_passkey

        return evaluate_passkey(payload, outputs["table"])
    if stage == "ruler":
        from ltstudy.evaluate.ruler_eval import evaluate_ruler

        return evaluate_ruler(payload, outputs["table"])
    if stage == "lm_eval":
        from ltstudy.evaluate.lm_eval import evaluate_lm_eval

        return evaluate_lm_eval(payload, outputs["table"])
    if stage == "throughput":
        from ltstudy.evaluate.throughput import evaluate_throughput

        return evaluate_throughput(payload, outputs["table"])
    raise ValueError(f"unknown stage {stage!r}")
