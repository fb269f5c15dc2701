"""The planner: for every run, the layout it trains and evaluates under and proof that it fits.

`plan_run(spec)` estimates the peak memory per GPU of the run's training step (see
`ltstudy.plan.memory`) under candidate layouts and picks, where the config says `auto`, the
smallest context-parallel degree (ranks that share one sequence, data x context = the job's
ranks), then the least recomputation, then the largest micro-batch that fit
`resources.train.gpu_memory_gb` (on the CPU, the job's memory per task). It also estimates the
GPU-hours at a stated MFU. `plan_evaluations(spec)` picks, for each evaluation length, the
smallest context degree among the evaluation job's GPUs that fits. Config validation runs
both, so a run that cannot fit fails before anything is submitted; `ltstudy plan` prints them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ltstudy.plan.memory import (
    GB,
    Estimate,
    Shape,
    longest_span,
    parameter_counts,
    prefill_memory,
    training_memory,
)

HEADROOM = 0.92  # of a GPU's memory usable by tensors: the caching allocator fragments
DEFAULT_MFU = 0.4
DEFAULT_PEAK_TFLOPS = 989.0  # dense bf16 of an H100/H200 (the datasheet)
CHECKPOINTING_ORDER = ("none", "selective", "full")  # least recomputation first
MOST_NODES = 64  # how far `Plan.needs_nodes` looks


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
    status: str  # fits | does not fit
    needs_nodes: int | None = None  # when it does not fit: the fewest nodes that would

    @property
    def fits(self) -> bool:
        return self.status == "fits"

    def describe(self) -> str:
        hint = f"; fits with resources.train.nodes: {self.needs_nodes}" if self.needs_nodes else ""
        return (
            f"{self.nodes} x {self.gpus_per_node} {self.device}, data {self.data_parallel} x "
            f"context {self.context_parallel}, micro-batch {self.micro_batch_size}, "
            f"checkpointing {self.activation_checkpointing}: "
            f"{self.estimate.total / GB:.1f} GB of {self.capacity / GB:.1f} GB per rank{hint}"
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
    if (spec["model"].get("ttt") or {}).get("reset_at_documents"):
        tried += [f"context {k}: not with model.ttt.reset_at_documents" for k in degrees if k > 1]
        degrees = [k for k in degrees if k == 1]
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
        try:
            span = longest_span(context, degree, spec["model"])
        except ValueError as err:
            tried.append(f"context {degree}: {err}")
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
                shape = Shape(device, dtype, world, shard, micro * span, micro, degree, context)
                estimate = training_memory(spec["model"], shape, level)
                yield _Candidate(degree, data_parallel, level, micro, estimate)


def _choose(spec: Mapping[str, Any], capacity: float) -> tuple[_Candidate, bool]:
    """The first candidate layout that fits (and True), else the one that needs least memory."""
    tried: list[str] = []
    chosen = None
    for candidate in _candidates(spec, tried):
        if candidate.estimate.total <= capacity:
            return candidate, True
        if chosen is None or candidate.estimate.total < chosen.estimate.total:
            chosen = candidate
        tried.append(
            f"context {candidate.context_parallel}, {candidate.activation_checkpointing}, "
            f"micro {candidate.micro_batch_size}: {candidate.estimate.total / GB:.1f} GB"
        )
    if chosen is None:
        field = "micro_batch_size" if "micro_batch_size" in " ".join(tried) else "batch_size"
        raise PlanError(f"train.{field}", f"{spec['run_id']}: " + "; ".join(tried))
    return chosen, False


def _nodes_that_fit(spec: Mapping[str, Any], capacity: float) -> int | None:
    """The fewest nodes (doubling, up to MOST_NODES) under which the run would fit."""
    nodes = spec["layout"]["nodes"] * 2
    while nodes <= MOST_NODES:
        try:
            if _choose({**spec, "layout": {**spec["layout"], "nodes": nodes}}, capacity)[1]:
                return nodes
        except PlanError:  # the batch does not split over so many ranks
            return None
        nodes *= 2
    return None


def plan_run(
    spec: Mapping[str, Any],
    mfu: float = DEFAULT_MFU,
    peak_tflops: float = DEFAULT_PEAK_TFLOPS,
) -> Plan:
    """The layout of a training run and its memory estimate (see the module docstring): the
    first candidate that fits, else the one that needs least memory, marked as not fitting
    with the number of nodes that would fit it."""
    layout, resources = spec["layout"], spec["resources"]["train"]
    capacity = capacity_bytes({**resources, "tasks_per_node": layout["tasks_per_node"]})
    chosen, fits = _choose(spec, capacity)
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
        status="fits" if fits else "does not fit",
        needs_nodes=None if fits else _nodes_that_fit(spec, capacity),
    )


# evaluation stages that run long sequences, and whether they keep a decode cache
EVALUATIONS = {"perplexity": False, "passkey": True, "ruler": True}
MOST_RANKS = 1024  # how far `EvalPlan.needs` looks for a degree that would fit


@dataclass
class EvalPlan:
    run_id: str
    study: str
    stage: str
    length: int  # tokens of one sequence (a perplexity window, a prompt)
    context_parallel: int
    estimate: Estimate
    capacity: float
    status: str  # fits | does not fit
    needs: int | None = None  # when it does not fit: the smallest degree that would


def plan_evaluations(spec: Mapping[str, Any]) -> list[EvalPlan]:
    """For each long-sequence evaluation stage and length of a run: the memory of one
    sequence's forward pass (`prefill_memory`) split over the evaluation job's ranks (GPUs, or
    processes on the CPU; a sequence too short to split runs whole on each), and when it does
    not fit, the number of ranks that would fit it."""
    resources = spec["resources"]["evaluate"]
    device = "cuda" if resources["gpu"] else "cpu"
    dtype = "bf16" if device == "cuda" and spec["train"]["dtype"] == "bf16" else "fp32"
    world = (resources["gpu"] or resources["tasks_per_node"]) * resources["nodes"]
    capacity = capacity_bytes(resources)
    run = spec["run_id"], spec["study"]
    plans = []
    for stage, cached in EVALUATIONS.items():
        if stage not in spec["stages"]:
            continue
        for length in sorted(set(spec["evaluate"][stage]["lengths"])):

            def estimate(degree: int, length=length, cached=cached) -> Estimate | None:
                try:
                    longest_span(length, degree, spec["model"])
                except ValueError:
                    return None
                return prefill_memory(spec["model"], device, dtype, length, degree, cached)

            # The job splits each sequence over all its ranks, or runs it whole on each where
            # it is too short to split (ltstudy.evaluate.setup.Ranks.split).
            degree = world if estimate(world) is not None else 1
            chosen = estimate(degree)
            if chosen.total <= capacity:
                plans.append(EvalPlan(*run, stage, length, degree, chosen, capacity, "fits"))
                continue
            more = [
                world * 2**i
                for i in range(1, MOST_RANKS.bit_length())
                if world * 2**i <= MOST_RANKS
            ]
            needs = next((k for k in more if (e := estimate(k)) and e.total <= capacity), None)
            plans.append(
                EvalPlan(*run, stage, length, degree, chosen, capacity, "does not fit", needs)
            )
    return plans
