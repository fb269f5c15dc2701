"""Training: AdamW, warmup + cosine (or WSD) schedule, clipping, checkpoint and resume, on one
process or data-parallel over many (FSDP2), launched one process per GPU.

A run is a pure function of its spec: batches are drawn from (seed, step) and each rank reads
its share of the global batch, parameters are initialised from (seed, name), so a run
interrupted at any checkpoint and resumed, on the same or another number of ranks, produces the
same loss curve as an uninterrupted one. Sharded checkpoints are written every
`checkpoint_every` steps and when the processes receive SIGTERM or SIGUSR2 (Slurm's warning
before a time limit or a preemption); they are removed once the consolidated model is written.
Rank 0 alone prints and writes results.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ltstudy import progress
from ltstudy.checkpoint import (
    export_model,
    load_checkpoint,
    read_metadata,
    remove_checkpoints,
    resumable_checkpoints,
    safetensors_source,
    save_checkpoint,
)
from ltstudy.data.dataset import Batch, TokenData
from ltstudy.device import autocast, configure_threads
from ltstudy.models.config import ModelConfig
from ltstudy.models.transformer import build_model, seeded_values
from ltstudy.parallel.context import ContextGroup, ContextParallel, context_group
from ltstudy.parallel.distributed import World, close_world, init_world
from ltstudy.parallel.materialize import materialize
from ltstudy.parallel.parallelize import Layout, parallelize
from ltstudy.parallel.spans import span_multiple, span_problem
from ltstudy.preemption import requeue, slurm_job_state


class TrainingInterrupted(RuntimeError):
    """Raised after a stop signal once the checkpoint is safely on disk."""


def lr_at(step: int, train: Mapping[str, Any]) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then a cosine down to
    min_lr, or (schedule "wsd": warmup-stable-decay) the peak held until the last
    `decay_fraction` of the steps and a linear decay to min_lr over them."""
    peak, warmup, total = train["lr"], train["warmup_steps"], train["steps"]
    floor = peak * train["min_lr_ratio"]
    if step < warmup:
        return peak * (step + 1) / warmup
    if train["schedule"] == "wsd":
        decay_start = max(warmup, total - round(train["decay_fraction"] * total))
        progress = (step + 1 - decay_start) / max(1, total - decay_start)
        return peak - (peak - floor) * min(1.0, max(0.0, progress))
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


class StopSignals:
    """Turns SIGTERM/SIGUSR2 into a flag that the loop checks between optimizer steps, so a
    checkpoint is never written mid-step.

    Slurm sends USR2 `signal_delay_s` before a time limit and SIGTERM on preemption; both
    requeue a Slurm job once its checkpoint is written (through submitit's handler of its own
    signal, USR2), unless the job was cancelled. Under the local executor USR2 (the time
    limit) requeues too, while SIGTERM (someone stopping the job) stops it: the run resumes
    from its checkpoint when Snakemake runs it again.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum
        print(
            f"[train] received {signal.Signals(signum).name}; checkpointing after this step",
            flush=True,
        )

    def requeue(self, signum: int) -> None:
        """After the checkpoint: requeue the job if `signum` (the signal the ranks agreed on)
        asks for it and submitit runs the job. Does not return when the job is requeued (the
        process exits)."""
        requeue(signum, self._previous.get(signal.SIGUSR2))


def make_optimizer(model: torch.nn.Module, train: Mapping[str, Any]) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": train["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # foreach (not fused): it works on FSDP2's sharded DTensor parameters on every device
    return torch.optim.AdamW(
        groups, lr=train["lr"], betas=(train["beta1"], train["beta2"]), foreach=True
    )


def run_paths(spec: Mapping[str, Any]) -> dict[str, Path]:
    run_dir = Path(spec["run_dir"])
    return {
        "model": run_dir / "model.safetensors",
        "curve": run_dir / "train_curve.parquet",
        "checkpoints": run_dir / "checkpoints",
    }


@dataclass(frozen=True)
class Share:
    """This rank's part of every step: which rows of the global batch, in micro-batches of
    what size, the factor that undoes FSDP2's averaging of gradients over the ranks, and (with
    context parallelism) the group that splits each sequence and the chunk its spans keep."""

    rows: slice
    micro: int
    ranks: int
    context: ContextGroup | None = None
    span_multiple: int = 1

    def span(self, batch: Batch) -> tuple[Batch, ContextParallel | None]:
        """This rank's span of every sequence: columns [offset, offset + span + 1) of the
        [rows, context + 1] tensors hold its inputs and, shifted by one, its labels."""
        if self.context is None:
            return batch, None
        split = self.context.split(batch[0].shape[1] - 1, self.span_multiple)
        start = split.offset
        return tuple(x[:, start : start + split.length + 1] for x in batch), split


def job_layout(spec: Mapping[str, Any], world: World) -> tuple[Layout, Share]:
    """The planned layout, fitted to the world this job actually has (one process when a stage
    is debugged in place, say), and this rank's share of each batch: ranks form a (data,
    context) mesh; a context group shares its rows and splits each sequence over its ranks."""
    planned = spec["layout"]
    degree = planned["context"] if world.size > 1 else 1
    if world.size % degree:
        raise ValueError(
            f"{spec['run_id']}: config field `parallel.context`: {degree} does not divide the "
            f"job's {world.size} ranks"
        )
    data_parallel = world.size // degree
    batch = spec["train"]["batch_size"]
    if batch % data_parallel:
        raise ValueError(
            f"{spec['run_id']}: config field `train.batch_size`: {batch} sequences do not split "
            f"evenly over {data_parallel} data-parallel ranks"
        )
    multiple = span_multiple(spec["model"])
    problem = span_problem(spec["model"], spec["context"], degree)
    if problem:
        raise ValueError(f"{spec['run_id']}: config field `parallel.context`: {problem}")
    rows = batch // data_parallel
    micro = min(planned["micro_batch_size"], rows)
    while rows % micro:
        micro -= 1
    bf16 = world.device.type == "cuda" and spec["train"]["dtype"] == "bf16"
    layout = Layout(
        activation_checkpointing=planned["activation_checkpointing"],
        hybrid_shard=planned["hybrid_shard"],
        param_dtype="bf16" if bf16 else "fp32",
    )
    group = context_group(world.device.type, world.size, degree) if degree > 1 else None
    data_rank = world.rank if group is None else group.data_rank
    rows_slice = slice(data_rank * rows, (data_rank + 1) * rows)
    return layout, Share(rows_slice, micro, world.size, group, multiple)


def build_training_model(spec: Mapping[str, Any], layout: Layout, world: World) -> torch.nn.Module:
    """The run's model, parallelised for this job, with its initial weights: seeded, from
    another run's final model (`init_from`) or from a Hugging Face checkpoint."""
    cfg = ModelConfig.from_dict(spec["model"])
    model = parallelize(build_model(cfg, seed=None, device="meta"), layout, world)
    seeded = seeded_values(cfg, spec["seed"])
    if spec.get("init_from_dir"):
        source = Path(spec["init_from_dir"]) / "model.safetensors"
        materialize(model, world.device, safetensors_source(source), str(source))
    elif spec["model"].get("pretrained"):
        from ltstudy.models.pretrained import load_weights

        load_weights(model, spec["model"]["pretrained"], device=world.device, fallback=seeded)
    else:
        materialize(model, world.device, seeded)
    return model


def forward_backward(
    model: torch.nn.Module,
    batch: Batch,
    share: Share,
    spec: Mapping[str, Any],
    counts: tuple[float, float],
) -> float:
    """Accumulate the gradients of this rank's rows in micro-batches; return the sum of their
    token losses. The objective is the mean over the global batch's tokens (and, weighted,
    over its answer tokens): each micro-batch's sums are divided by the global `counts`
    (non-padding tokens, answer tokens), so it does not depend on how the batch is split
    into ranks and micro-batches. TTT layers with `reset_at_documents` restart at the
    documents the model finds in the ids (after each end-of-document token)."""
    cfg = spec["train"]
    device = next(model.parameters()).device
    answer_weight = cfg["answer_loss_weight"]
    tokens, answers = (max(c, 1.0) for c in counts)
    loss_sum = 0.0
    batch, context = share.span(batch)
    for part, marked, pad in zip(*(x.to(device).split(share.micro) for x in batch), strict=True):
        if context is None:
            part, marked, pad = without_trailing_padding(part, marked, pad)
        with autocast(device, cfg["dtype"]):
            losses = model.token_losses(part[:, :-1], part[:, 1:], context=context)
        token_sum = (losses * ~pad[:, 1:]).sum()
        objective = token_sum / tokens
        if answer_weight:
            answer_mean = (losses * marked[:, 1:]).sum() / answers
            objective = (objective + answer_weight * answer_mean) / (1 + answer_weight)
        (objective * share.ranks).backward()
        loss_sum += token_sum.item()
    return loss_sum


def without_trailing_padding(*rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the columns that are padding in every row (the last of `rows` is the padding
    mask): one-document windows are padded to the context, and a causal model computes
    nothing from those columns that earlier positions see."""
    padding = rows[-1]
    used = int((~padding).sum(dim=1).max()) if padding.any() else padding.shape[1]
    keep = max(used, 2)  # at least one input and its label
    return tuple(x[:, :keep] for x in rows)


def batch_counts(batch: Batch, world: World) -> tuple[float, float]:
    """(non-padding tokens, answer tokens) predicted in the global batch."""
    _, answers, padding = batch
    local = (float((~padding[:, 1:]).sum()), float(answers[:, 1:].sum()))
    return world.sum(local[0]), world.sum(local[1])


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TokenData,
    spec: Mapping[str, Any],
    step: int,
    share: Share,
    world: World,
    before_update: Callable[[torch.nn.Module], None] | None = None,
) -> tuple[float, float]:
    """One optimizer step (0-based `step`) on every rank: (mean loss over the global batch,
    gradient norm before clipping). `before_update` sees the accumulated gradients."""
    cfg = spec["train"]
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    batch = data.sample_batch(
        cfg["batch_size"], spec["context"] + 1, spec["seed"], step, cfg["windows"], share.rows
    )
    counts = batch_counts(share.span(batch)[0], world)
    loss_sum = forward_backward(model, batch, share, spec, counts)
    loss = world.sum(loss_sum) / max(counts[0], 1.0)
    if before_update is not None:
        before_update(model)
    grad_norm = clip_gradients(model, cfg["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (over all shards); return it before clipping."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
    return float(norm)


def train(spec: Mapping[str, Any], on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train one run to completion (resuming if a checkpoint exists); return a summary. Joins
    the job's process group if it has one."""
    world = init_world()
    try:
        return _train(spec, world, on_step)
    finally:
        close_world(world)


def _train(
    spec: Mapping[str, Any], world: World, on_step: Callable[[int], None] | None
) -> dict[str, Any]:
    from ltstudy.results.schemas import identity, write_table  # polars: not on a bare GPU image

    paths = run_paths(spec)
    cfg = spec["train"]
    tag = spec["run_id"]
    device = world.device
    configure_threads(spec["resources"]["train"]["cpus_per_task"])
    torch.manual_seed(spec["seed"])

    def log(message: str) -> None:
        if world.is_main:
            print(f"[train {tag}] {message}", flush=True)

    data = TokenData.load(spec["data_dir"], "train")
    answer_weight = cfg["answer_loss_weight"]
    if answer_weight and not data.n_answer_tokens:
        raise ValueError(
            f"{tag}: train.answer_loss_weight is {answer_weight} but {spec['data_dir']} marks no "
            "answer tokens; add recall or passkey documents to data.synthetic.mix (a data "
            "folder built before answers were marked must be deleted and rebuilt)"
        )
    layout, share = job_layout(spec, world)
    if device.type == "cuda":
        planned = spec["resources"]["train"]["gpu_memory_gb"]
        actual = torch.cuda.get_device_properties(device).total_memory / 1e9
        if actual < 0.97 * planned:
            log(
                f"warning: planned for GPUs of {planned:g} GB (resources.train.gpu_memory_gb) "
                f"but this one has {actual:.0f} GB; the layout may not fit"
            )
    model = build_training_model(spec, layout, world)
    optimizer = make_optimizer(model, cfg)
    start_step, curve, elapsed = 0, [], 0.0
    for found, state in resumable_checkpoints(paths["checkpoints"], spec["config_hash"], world):
        if load_checkpoint(found, model, optimizer, world):
            start_step, curve, elapsed = state["step"], state["curve"], state["elapsed_s"]
            log(
                f"resuming from step {start_step} ({found}, written by {state['world_size']} "
                f"rank(s), now {world.size})"
            )
            break
        del model, optimizer  # half-loaded: start again from the initial weights
        model = build_training_model(spec, layout, world)
        optimizer = make_optimizer(model, cfg)

    def checkpoint(step: int) -> None:
        save_checkpoint(
            paths["checkpoints"],
            step,
            model,
            optimizer,
            {"curve": curve, "elapsed_s": elapsed, "config_hash": spec["config_hash"]},
            world,
        )

    steps, batch = cfg["steps"], cfg["batch_size"]
    seq_tokens = batch * spec["context"]
    params = sum(p.numel() for p in model.parameters())
    degree = 1 if share.context is None else share.context.size
    split = f", each split over {degree} context ranks" if degree > 1 else ""
    log(
        f"{spec['variant']} {spec['size']} on {world.size} x {device.type}: {steps} steps x "
        f"{seq_tokens:,} tokens, {params:,} parameters; {batch * degree // world.size} "
        f"sequences per rank{split}, in micro-batches of {share.micro}, activation "
        f"checkpointing {layout.activation_checkpointing}"
    )
    model.train()
    progress.update(start_step, steps, "steps")
    segment_start, segment_steps = time.perf_counter(), 0
    with StopSignals() as stop:
        for step in range(start_step, steps):
            t0 = time.perf_counter()
            loss, grad_norm = train_step(model, optimizer, data, spec, step, share, world)
            lr = lr_at(step, cfg)
            dt = time.perf_counter() - t0
            elapsed += dt
            segment_steps += 1
            curve.append(
                {
                    **identity(spec),
                    "step": step + 1,
                    "tokens": (step + 1) * seq_tokens,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": seq_tokens / dt,
                    "elapsed_s": elapsed,
                }
            )
            done = step + 1
            progress.update(done, steps, "steps", loss)
            if done % cfg["log_every"] == 0 or done == steps or done == start_step + 1:
                rate = (time.perf_counter() - segment_start) / segment_steps
                log(
                    f"step {done}/{steps} loss {loss:.4f} lr {lr:.2e} grad {grad_norm:.2f} "
                    f"{seq_tokens / dt:,.0f} tok/s elapsed {progress.format_duration(elapsed)} "
                    f"eta {progress.format_duration(rate * (steps - done))}"
                )
            stopping = world.sum(float(stop.received is not None)) > 0
            if stopping:
                checkpoint(done)
                log(f"checkpoint saved at step {done}")
                term = world.sum(float(stop.received == signal.SIGTERM)) > 0
                stop.requeue(signal.SIGTERM if term else signal.SIGUSR2)
                name = signal.Signals(stop.received).name if stop.received else "a peer's signal"
                if slurm_job_state() == "CANCELLED":
                    name += " (the Slurm job was cancelled)"
                raise TrainingInterrupted(
                    f"{tag}: stopped by {name} at step {done}/{steps}; "
                    f"checkpoint {paths['checkpoints']} is saved, rerun to resume"
                )
            if done % cfg["checkpoint_every"] == 0 and done < steps:
                checkpoint(done)
            if on_step is not None:
                on_step(done)

    metadata = {
        "format": "ltstudy",
        "model_config": json.dumps(spec["model"], sort_keys=True),
        "config_hash": spec["config_hash"],
        "step": steps,
        "world_size": world.size,
        "context_parallel": degree,
    }
    export_model(model, paths["model"], metadata, world)
    world.barrier()
    final = curve[-1]["loss"] if curve else float("nan")
    if world.is_main:
        write_table("train_curves", curve, paths["curve"])
        remove_checkpoints(paths["checkpoints"])
    log(f"done: final loss {final:.4f} in {progress.format_duration(elapsed)}")
    return {
        "steps": steps,
        "tokens": steps * seq_tokens,
        "final_loss": final,
        "train_s": elapsed,
        "world_size": world.size,
        "context_parallel": degree,
    }


def load_trained(spec: Mapping[str, Any], device: torch.device) -> torch.nn.Module:
    """The final trained model of a run, in eval mode (no process group needed). On a GPU a
    bf16 run's weights are held in bf16, as its training computed with them (half the
    memory of float32 weights plus autocast's copies)."""
    path = run_paths(spec)["model"]
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: train the run first")
    metadata = read_metadata(path)
    if metadata.get("config_hash") != spec["config_hash"]:
        raise ValueError(f"{path} was trained with a different configuration; retrain the run")
    model = build_model(json.loads(metadata["model_config"]), seed=None, device="meta")
    if device.type == "cuda" and spec["train"]["dtype"] == "bf16":
        model = model.to(torch.bfloat16)
    materialize(model, device, safetensors_source(path), str(path))
    return model.eval()
