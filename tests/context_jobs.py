"""Run a computation on a sequence split over real context-parallel ranks (processes started
by submitit's local executor, gloo), and the same computation on one process, for tests.

`split_run(tmp_path, run, inputs, degree, multiple)` calls `run(inputs, context)` on every
rank with that rank's span of each input (sequence dimension 1) and `run(inputs, None)` on one
process with the whole inputs. `run` returns an output [B, span, ...] and the module whose
parameter gradients to compare; both paths backpropagate the same random projection of the
output. Returned: {"parallel": ..., "single": ...}, each with the whole output, the
parameter gradients and the input gradients (parallel ones summed over ranks), and the bytes
each rank sent.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ltstudy.launch import make_executor, submitit_parameters
from ltstudy.models.transformer import build_model
from ltstudy.parallel.context import ContextParallel, split_spans
from ltstudy.parallel.distributed import joined_world

Run = Callable[[Mapping[str, Tensor], ContextParallel | None], tuple[Tensor, torch.nn.Module]]


def _one_pass(run: Run, inputs: Mapping[str, Tensor], context, probe: Tensor) -> dict[str, Any]:
    leaves = {
        k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()
    }
    out, module = run(leaves, context)
    (out * probe[:, : out.shape[1]]).sum().backward()
    params = {
        n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None
    }
    grads = {k: v.grad for k, v in leaves.items() if v.grad is not None}
    return {"out": out.detach(), "params": params, "inputs": grads}


def _probe(inputs: Mapping[str, Tensor], run: Run) -> Tensor:
    with torch.no_grad():
        out, _ = run({k: v.clone() for k, v in inputs.items()}, None)
    g = torch.Generator().manual_seed(1234)
    return torch.randn(out.shape, generator=g, dtype=out.dtype)


def _rank_job(
    run: Run, inputs: Mapping[str, Tensor], spans: tuple[int, ...], probe: Tensor
) -> dict[str, Any]:
    with joined_world() as world:
        context = ContextParallel(dist.group.WORLD, world.rank, spans)
        start, length = context.offset, context.length
        probe = probe[:, start : start + length]
        mine = {k: v[:, start : start + length] for k, v in inputs.items()}
        result = _one_pass(run, mine, context, probe)
        outputs = [None] * world.size
        dist.all_gather_object(outputs, result["out"])
        for value in result["params"].values():
            dist.all_reduce(value)
        # Input gradients: each rank's span, placed in the whole sequence.
        placed = {}
        for key, value in result["inputs"].items():
            whole = torch.zeros_like(inputs[key], dtype=value.dtype)
            whole[:, start : start + length] = value
            dist.all_reduce(whole)
            placed[key] = whole
        return {
            "out": torch.cat(outputs, dim=1),
            "params": result["params"],
            "inputs": placed,
            "sent": dict(context.traffic.sent),
        }


def split_run(
    tmp_path: Path, run: Run, inputs: Mapping[str, Tensor], degree: int = 2, multiple: int = 1
) -> dict[str, Any]:
    """`run` on `degree` context-parallel ranks and on one process (see the module doc)."""
    spans = split_spans(next(iter(inputs.values())).shape[1], degree, multiple)
    params = submitit_parameters(
        {"gpu": 0, "runtime": 10, "tasks_per_node": degree}, "local", "context"
    )
    probe = _probe(inputs, run)
    job = make_executor("local", tmp_path / "context-jobs", params).submit(
        _rank_job, run, dict(inputs), spans, probe
    )
    single = _one_pass(run, inputs, None, probe)
    results = job.results()
    parallel = dict(results[0])
    parallel["sent"] = [r["sent"] for r in results]
    return {"parallel": parallel, "single": single, "spans": spans}


def assert_same(result: Mapping[str, Any], atol: float = 1e-9) -> None:
    """Outputs, parameter gradients and input gradients agree between the two paths."""
    one, many = result["single"], result["parallel"]
    torch.testing.assert_close(many["out"], one["out"], rtol=0, atol=atol, msg="output")
    assert many["params"].keys() == one["params"].keys()
    for name, grad in one["params"].items():
        torch.testing.assert_close(many["params"][name], grad, rtol=0, atol=atol, msg=name)
    for name, grad in one["inputs"].items():
        torch.testing.assert_close(many["inputs"][name], grad, rtol=0, atol=atol, msg=name)


def greedy_logits(model_cfg: Mapping, ids: Tensor, steps: int, context=None) -> Tensor:
    """Logits [B, 1 + steps, vocab] of a prefill of ids (this rank's span with a context) and
    `steps` greedy decode steps, in float64, from a model whose zero-initialised parameters
    (TTT's target conv, biases) are moved, so that every cached state shows in the logits."""
    model = build_model(dict(model_cfg), seed=3).double().eval()
    cache = model.new_cache()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ttt_conv" in name or name.endswith("bias"):
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if context is not None:
            ids = ids[:, context.offset : context.offset + context.length]
        last = model.lm_head(model.hidden_states(ids, cache, context)[:, -1:])
        if context is not None:
            last = context.from_last(last, last.device)
        logits = [last]
        for _ in range(steps):
            logits.append(model(logits[-1].argmax(-1), cache)[:, -1:])
    return torch.cat(logits, dim=1)


def _generate_job(cases: list, spans_of: list) -> list[Tensor]:
    with joined_world() as world:
        return [
            greedy_logits(cfg, ids, steps, ContextParallel(dist.group.WORLD, world.rank, spans))
            for (cfg, ids, steps), spans in zip(cases, spans_of, strict=True)
        ]


def split_generate(tmp_path: Path, cases: list, degree: int, multiples: list[int]) -> list:
    """For each (model config, ids, steps): (every rank's logits of a split prefill and greedy
    decoding, the single process's)."""
    spans_of = [
        split_spans(ids.shape[1], degree, m)
        for (_, ids, _), m in zip(cases, multiples, strict=True)
    ]
    params = submitit_parameters(
        {"gpu": 0, "runtime": 10, "tasks_per_node": degree}, "local", "context"
    )
    job = make_executor("local", tmp_path / "generate-jobs", params).submit(
        _generate_job, cases, spans_of
    )
    single = [greedy_logits(cfg, ids, steps) for cfg, ids, steps in cases]
    ranks = job.results()
    return [([r[i] for r in ranks], single[i]) for i in range(len(cases))]
