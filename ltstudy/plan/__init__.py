"""The planner: for every run, the layout it trains under and proof that it fits.

`plan_run(spec)` estimates the peak memory per GPU of the run's training step (see
`ltstudy.plan.memory`) under candidate layouts and picks, where the config says `auto`, the
least recomputation and then the largest micro-batch that fit `resources.train.gpu_memory_gb`
(on the CPU, the job's memory per task); if none fits, the smallest context-parallel degree
that would. It also estimates the GPU-hours at a stated MFU. Config validation runs it, so a
run that cannot fit fails before anything is submitted; `ltstudy plan` prints the table.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ltstudy.plan.memory import GB, Estimate, Shape, parameter_counts, training_memory

HEADROOM = 0.92  # of a GPU's memory usable by tensors: the caching allocator fragments
DEFAULT_MFU = 0.4
DEFAULT_PEAK_TFLOPS = 989.0  # dense bf16 of an H100/H200 (the datasheet)
CHECKPOINTING_ORDER = ("none", "selective", "full")  # least recomputation first


class PlanError(ValueError):
    """No layout can even be formed (the batch does not split); names the config field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class Plan:
    run_id: str
    study: str
    size: str
    context: int
    params: int
    tokens: int
    nodes: int
    gpus_per_node: int  # ranks per node (GPUs, or CPU processes)
    device: str
    context_parallel: int
    data_parallel: int
    activation_checkpointing: str
    micro_batch_size: int
    estimate: Estimate
    capacity: float  # bytes one rank may use
    gpu_hours: float
    status: str  # fits | needs context parallel | does not fit

    @property
    def fits(self) -> bool:
        return self.status == "fits"

    @property
    def runnable(self) -> bool:
        """Training can run this plan today (context parallelism is not implemented yet)."""
        return self.fits and self.context_parallel == 1

    def describe(self) -> str:
        return (
            f"{self.nodes} x {self.gpus_per_node} {self.device}, data {self.data_parallel} x "
            f"context {self.context_parallel}, micro-batch {self.micro_batch_size}, "
            f"checkpointing {self.activation_checkpointing}: "
            f"{self.estimate.total / GB:.1f} GB of {self.capacity / GB:.1f} GB per rank"
        )


def capacity_bytes(resources: Mapping[str, Any]) -> float:
    """What one rank may use: a GPU's memory less headroom, or the job's memory per task."""
    if resources["gpu"]:
        return resources["gpu_memory_gb"] * GB * HEADROOM
    return resources["mem_mb"] * 1e6 / resources["tasks_per_node"]


def _divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def train_flops(spec: Mapping[str, Any], params: int, checkpointing: str) -> float:
    """FLOPs of the whole run: 3x the forward per token (4x with full recomputation)."""
    from ltstudy.models.flops import forward_flops_per_token

    forward = forward_flops_per_token(spec["model"], params, spec["context"])
    recompute = {"none": 0.0, "selective": 0.5, "full": 1.0}[checkpointing]
    return (3 + recompute) * forward * spec["train"]["tokens"]


@dataclass(frozen=True)
class _Candidate:
    context_parallel: int
    data_parallel: int
    activation_checkpointing: str
    micro_batch_size: int
    estimate: Estimate


def _candidates(spec: Mapping[str, Any], tried: list[str]) -> Iterator[_Candidate]:
    """Layouts in the order of preference: the smallest context degree, the least
    recomputation, the largest micro-batch; what cannot even be formed goes to `tried`."""
    layout, resources = spec["layout"], spec["resources"]["train"]
    nodes, per_node = layout["nodes"], layout["tasks_per_node"]
    world = nodes * per_node
    device = "cuda" if resources["gpu"] else "cpu"
    dtype = "bf16" if device == "cuda" and spec["train"]["dtype"] == "bf16" else "fp32"
    grouped = world > 1 or device == "cuda"  # FSDP2 whenever there is a process group
    shard = (per_node if layout["hybrid_shard"] and nodes > 1 else world) if grouped else 1
    batch, context = spec["train"]["batch_size"], spec["context"]
    if layout["context"] == "auto":
        degrees = [k for k in _divisors_descending(world)[::-1] if k <= context]
    else:
        degrees = [layout["context"]]
    levels = (
        CHECKPOINTING_ORDER
        if layout["activation_checkpointing"] == "auto"
        else (layout["activation_checkpointing"],)
    )
    requested = layout["micro_batch_size"]
    for degree in degrees:
        data_parallel = world // degree
        if world % degree or batch % data_parallel:
            tried.append(f"context {degree}: batch {batch} does not split over {data_parallel}")
            continue
        rows = batch // data_parallel
        if requested not in (None, "auto") and rows % requested:  # explicit, must divide
            tried.append(
                f"context {degree}: micro_batch_size {requested} does not divide the {rows} "
                f"sequences each of {data_parallel} data-parallel ranks gets"
            )
            continue
        # auto: every divisor, largest first; a number, or null (the rank's whole share): it
        micros = _divisors_descending(rows) if requested == "auto" else [requested or rows]
        for level in levels:
            for micro in micros:
                tokens = micro * math.ceil(context / degree)
                shape = Shape(device, dtype, world, shard, tokens, micro)
                estimate = training_memory(spec["model"], shape, level)
                yield _Candidate(degree, data_parallel, level, micro, estimate)


def plan_run(
    spec: Mapping[str, Any],
    mfu: float = DEFAULT_MFU,
    peak_tflops: float = DEFAULT_PEAK_TFLOPS,
) -> Plan:
    """The layout of a training run and its memory estimate (see the module docstring): the
    first candidate that fits, else the one that needs least memory, marked as not fitting."""
    layout, resources = spec["layout"], spec["resources"]["train"]
    capacity = capacity_bytes({**resources, "tasks_per_node": layout["tasks_per_node"]})
    tried: list[str] = []
    chosen, status = None, "does not fit"
    for candidate in _candidates(spec, tried):
        if candidate.estimate.total <= capacity:
            chosen = candidate
            status = "fits" if candidate.context_parallel == 1 else "needs context parallel"
            break
        if chosen is None or candidate.estimate.total < chosen.estimate.total:
            chosen = candidate
        tried.append(
            f"context {candidate.context_parallel}, {candidate.activation_checkpointing}, "
            f"micro {candidate.micro_batch_size}: {candidate.estimate.total / GB:.1f} GB"
        )
    if chosen is None:
        field = "micro_batch_size" if "micro_batch_size" in " ".join(tried) else "batch_size"
        raise PlanError(f"train.{field}", f"{spec['run_id']}: " + "; ".join(tried))
    params = parameter_counts(spec["model"])["total"]
    flops = train_flops(spec, params, chosen.activation_checkpointing)
    return Plan(
        run_id=spec["run_id"],
        study=spec["study"],
        size=spec["size"],
        context=spec["context"],
        params=params,
        tokens=spec["train"]["tokens"],
        nodes=layout["nodes"],
        gpus_per_node=layout["tasks_per_node"],
        device="cuda" if resources["gpu"] else "cpu",
        context_parallel=chosen.context_parallel,
        data_parallel=chosen.data_parallel,
        activation_checkpointing=chosen.activation_checkpointing,
        micro_batch_size=chosen.micro_batch_size,
        estimate=chosen.estimate,
        capacity=capacity,
        gpu_hours=flops / (mfu * peak_tflops * 1e12) / 3600,
        status=status,
    )
