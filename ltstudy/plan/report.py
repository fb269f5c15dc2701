"""The planner's tables, training and evaluation: one line per run, or per group of like runs."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

from ltstudy.config import context_label
from ltstudy.plan import EvalPlan, Plan
from ltstudy.plan.memory import GB


def _layout(plan: Plan) -> str:
    return (
        f"{plan.nodes}x{plan.gpus_per_node} dp{plan.data_parallel} cp{plan.context_parallel} "
        f"{plan.activation_checkpointing} mb{plan.micro_batch_size}"
    )


def _count(n: float) -> str:
    """1.44e9 -> '1.44B', 8.5e5 -> '0.85M'."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _status(plan: Plan) -> str:
    if plan.needs_nodes:
        return f"{plan.status}: fits on {plan.needs_nodes} nodes"
    return plan.status


def _eval_status(plan: EvalPlan) -> str:
    if plan.needs:
        return f"{plan.status}: fits on {plan.needs} GPUs"
    return plan.status


def plan_table(plans: Sequence[Plan], mfu: float, peak: float, summary: bool = False) -> str:
    lines = [
        f"GPU-hours at {100 * mfu:.0f}% MFU of {peak:g} TFLOP/s; memory per GPU (rank); "
        "layout = nodes x GPUs per node, data- and context-parallel degrees, activation "
        "checkpointing, micro-batch (sequences per rank per forward)",
        "",
    ]
    if summary:  # a Markdown table: like runs (same study, size, context, layout) on one line
        lines += [
            "| study | runs | size | context | layout | GB/GPU (max) | GPU-hours | status |",
            "|---|---:|---|---:|---|---:|---:|---|",
        ]

        def key(p: Plan):
            return (p.study, p.size, p.context, _layout(p), _status(p))

        order = {study: i for i, study in enumerate(dict.fromkeys(p.study for p in plans))}
        ordered = sorted(plans, key=lambda p: (order[p.study], *key(p)[1:]))
        for (study, size, context, layout, status), group in groupby(ordered, key=key):
            group = list(group)
            lines.append(
                f"| {study} | {len(group)} | {size} | {context_label(context)} | {layout} | "
                f"{max(p.estimate.total for p in group) / GB:.1f} | "
                f"{sum(p.gpu_hours for p in group):,.0f} | {status} |"
            )
    else:  # with the estimate's parts: training state, FSDP2 buffers, activations, transient
        lines.append(
            f"{'run':<46} {'params':>7} {'tokens':>8} {'layout':<28} {'state':>6} "
            f"{'fsdp':>5} {'acts':>6} {'trans':>6} {'GB/GPU':>7} {'of':>5} {'GPU-h':>8}  status"
        )
        for p in plans:
            e = p.estimate
            lines.append(
                f"{p.run_id:<46} {_count(p.params):>7} {_count(p.tokens):>8} {_layout(p):<28} "
                f"{e.state / GB:>6.1f} {e.gathered / GB:>5.1f} {e.activations / GB:>6.1f} "
                f"{e.transient / GB:>6.1f} {e.total / GB:>7.1f} {p.capacity / GB:>5.0f} "
                f"{p.gpu_hours:>8,.0f}  {_status(p)}"
            )
    fits = sum(p.fits for p in plans)
    split = sum(p.fits and p.context_parallel > 1 for p in plans)
    lines += [
        "",
        f"{len(plans)} training runs: {fits} fit as planned ({split} with context parallelism), "
        f"{len(plans) - fits} do not fit; {sum(p.gpu_hours for p in plans):,.0f} GPU-hours in all",
    ]
    return "\n".join(lines)


def eval_table(plans: Sequence[EvalPlan], summary: bool = False) -> str:
    """Per evaluation stage and length: the context degree (GPUs sharing one sequence) and the
    memory per GPU of one sequence's forward pass."""
    lines = [
        "Evaluation: memory per GPU of one sequence's forward pass (perplexity windows; passkey "
        "and RULER prompts, with their decode cache), split over the context degree's GPUs",
        "",
    ]
    if summary:  # like evaluations (same study, stage, degree, status) on one line
        lines += [
            "| study | stage | lengths | evaluations | context | GB/GPU (max) | status |",
            "|---|---|---|---:|---:|---:|---|",
        ]

        def key(p: EvalPlan):
            return (p.study, p.stage, p.context_parallel, _eval_status(p))

        order = {study: i for i, study in enumerate(dict.fromkeys(p.study for p in plans))}
        ordered = sorted(plans, key=lambda p: (order[p.study], *key(p)[1:]))
        for (study, stage, degree, status), group in groupby(ordered, key=key):
            group = list(group)
            lengths = sorted({p.length for p in group})
            span = context_label(lengths[0])
            if len(lengths) > 1:
                span += f"-{context_label(lengths[-1])}"
            lines.append(
                f"| {study} | {stage} | {span} | {len(group)} | {degree} | "
                f"{max(p.estimate.total for p in group) / GB:.1f} | {status} |"
            )
    else:  # with the estimate's parts: weights, residual stream, cache, largest forward piece
        lines.append(
            f"{'run':<46} {'stage':<10} {'length':>6} {'cp':>3} {'weights':>7} {'stream':>6} "
            f"{'cache':>6} {'peak':>6} {'GB/GPU':>7} {'of':>5}  status"
        )
        for p in plans:
            e = p.estimate
            lines.append(
                f"{p.run_id:<46} {p.stage:<10} {context_label(p.length):>6} "
                f"{p.context_parallel:>3} {e.state / GB:>7.1f} {e.activations / GB:>6.1f} "
                f"{e.cache / GB:>6.1f} {e.transient / GB:>6.1f} {e.total / GB:>7.1f} "
                f"{p.capacity / GB:>5.0f}  {_eval_status(p)}"
            )
    fits = sum(p.status == "fits" for p in plans)
    split = sum(p.status == "fits" and p.context_parallel > 1 for p in plans)
    lines += [
        "",
        f"{len(plans)} evaluations: {fits} fit ({split} with context parallelism), "
        f"{len(plans) - fits} do not fit",
    ]
    return "\n".join(lines)
