"""Run RULER's tasks on a trained model: greedy decoding through the cache, RULER's scoring.

Tasks that cannot run here (QA without its local data) are recorded as skipped, with the
reason, never silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ltstudy import progress
from ltstudy.data.dataset import document_texts
from ltstudy.data.tokenizer import get_tokenizer
from ltstudy.evaluate.passkey import greedy_decode
from ltstudy.evaluate.ruler import TaskSkipped, build_sources, generate, score
from ltstudy.evaluate.setup import (
    Ranks,
    count_points,
    evaluation_ranks,
    position_methods,
    trained_model,
)
from ltstudy.models.rope import scaling_label
from ltstudy.results.schemas import identity, write_table


def evaluate_ruler(spec: Mapping[str, Any], out_path: str) -> None:
    with evaluation_ranks() as ranks:
        _evaluate_ruler(spec, out_path, ranks)


def _evaluate_ruler(spec: Mapping[str, Any], out_path: str, ranks: Ranks) -> None:
    cfg = spec["evaluate"]["ruler"]
    model = trained_model(spec, ranks)
    tokenizer = get_tokenizer(spec["data"]["tokenizer"])
    texts = document_texts(spec["data_dir"], "validation", tokenizer, max_documents=200)
    sources = build_sources(texts, cfg["squad_path"], cfg["hotpotqa_path"])
    rows = []
    prompts = count_points(model, spec, cfg) * len(cfg["tasks"]) * cfg["samples"]
    for length in cfg["lengths"]:
        for scaling in position_methods(model, spec, cfg, length):
            for task in cfg["tasks"]:
                scores = []
                for index in range(cfg["samples"]):
                    progress.update(len(rows), prompts, "prompts")
                    base = {
                        **identity(spec),
                        "task": task,
                        "length": length,
                        "rope": scaling_label(scaling),
                        "sample": index,
                    }
                    try:
                        sample = generate(
                            task,
                            tokenizer,
                            length,
                            index,
                            cfg["seed"],
                            sources,
                            cfg["max_new_tokens"],
                        )
                    except TaskSkipped as why:
                        rows.append(
                            {
                                **base,
                                "status": "skipped",
                                "reason": str(why),
                                "score": None,
                                "prediction": None,
                                "references": None,
                            }
                        )
                        continue
                    new = greedy_decode(
                        model,
                        sample.prompt,
                        sample.max_new_tokens,
                        spec["train"]["dtype"],
                        tokenizer.eos_id,
                        ranks,
                    )
                    prediction = tokenizer.decode(new)
                    scores.append(score(prediction, sample.references, sample.metric))
                    rows.append(
                        {
                            **base,
                            "status": "ok",
                            "reason": None,
                            "score": scores[-1],
                            "prediction": prediction,
                            "references": json.dumps(sample.references),
                        }
                    )
                result = f"{sum(scores) / len(scores):.1f}" if scores else "skipped"
                if ranks.is_main:
                    print(
                        f"[ruler {spec['run_id']}] {task} length {length:,} "
                        f"rope {scaling_label(scaling)}: {result}",
                        flush=True,
                    )
    progress.update(len(rows), prompts, "prompts")
    if ranks.is_main:
        write_table("ruler", rows, out_path)
