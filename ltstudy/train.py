"""Training: AdamW, linear warmup + cosine decay, gradient clipping, checkpoint and resume.

A run is a pure function of its spec: batches are drawn from (seed, step), parameters are
initialised from (seed, name), so a run interrupted at any checkpoint and resumed produces the
same loss curve as an uninterrupted one. Checkpoints are written every `checkpoint_every` steps
and when the process receives SIGTERM or SIGUSR2 (Slurm's warning before a time limit or a
preemption); they are removed once the final model is written.
"""

from __future__ import annotations

import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ltstudy.data.dataset import TokenData
from ltstudy.device import autocast, configure_threads, pick_device
from ltstudy.io import atomic_path
from ltstudy.models.transformer import build_model
from ltstudy.results.schemas import identity, write_table


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
    """Turns SIGTERM/SIGUSR2 into a flag that the loop checks between optimizer steps.

    After saving, `forward()` hands the signal to whoever handled it before (submitit's
    handler requeues a Slurm job), so a checkpoint is never written mid-step.
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

    def forward(self) -> None:
        previous = self._previous.get(self.received)
        if callable(previous):
            previous(self.received, None)


def document_starts(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True where a new document begins: after an end-of-document token (and at position 0)."""
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, :-1] == eos_id
    starts[:, 0] = True
    return starts


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _optimizer(model: torch.nn.Module, train: Mapping[str, Any], device: torch.device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": train["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=train["lr"],
        betas=(train["beta1"], train["beta2"]),
        fused=device.type == "cuda",
    )


def run_paths(spec: Mapping[str, Any]) -> dict[str, Path]:
    run_dir = Path(spec["run_dir"])
    return {
        "model": run_dir / "model.pt",
        "curve": run_dir / "train_curve.parquet",
        "checkpoint": run_dir / "checkpoints" / "last.pt",
    }


def load_checkpoint(path: Path, config_hash: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("config_hash") != config_hash:
        print(f"[train] ignoring {path}: written by a different configuration", flush=True)
        return None
    return state


def masked_mean(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean loss over the positions `mask` marks (0 where it marks none): the answer tokens,
    or every token that is not padding."""
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def train(spec: Mapping[str, Any], on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train one run to completion (resuming if a checkpoint exists); return a summary."""
    paths = run_paths(spec)
    cfg = spec["train"]
    tag = spec["run_id"]
    device = pick_device()
    configure_threads(spec["resources"]["train"]["cpus_per_task"])
    torch.manual_seed(spec["seed"])

    if device.type == "cuda" and torch.cuda.device_count() > 1:
        print(
            f"[train {tag}] warning: {torch.cuda.device_count()} GPUs visible but training uses "
            "one (multi-GPU data parallelism is not implemented yet)",
            flush=True,
        )
    data = TokenData.load(spec["data_dir"], "train")
    answer_weight = cfg["answer_loss_weight"]
    if answer_weight and not data.n_answer_tokens:
        raise ValueError(
            f"{tag}: train.answer_loss_weight is {answer_weight} but {spec['data_dir']} marks no "
            "answer tokens; add recall or passkey documents to data.synthetic.mix (a data "
            "folder built before answers were marked must be deleted and rebuilt)"
        )
    model = build_model(spec["model"], seed=spec["seed"], device=device)
    if spec.get("init_from_dir"):
        source = Path(spec["init_from_dir"]) / "model.pt"
        model.load_state_dict(
            torch.load(source, map_location=device, weights_only=False)["state_dict"]
        )
        print(f"[train {tag}] weights from {source}", flush=True)
    elif spec["model"].get("pretrained"):
        from ltstudy.models.pretrained import load_weights

        load_weights(model, spec["model"]["pretrained"])
        print(f"[train {tag}] weights from {spec['model']['pretrained']}", flush=True)
    optimizer = _optimizer(model, cfg, device)
    start_step, curve, elapsed = 0, [], 0.0
    state = load_checkpoint(paths["checkpoint"], spec["config_hash"])
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, curve, elapsed = state["step"], state["curve"], state["elapsed_s"]
        print(f"[train {tag}] resuming from step {start_step} ({paths['checkpoint']})", flush=True)

    def save_checkpoint(step: int) -> None:
        with atomic_path(paths["checkpoint"]) as tmp:
            torch.save(
                {
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "curve": curve,
                    "elapsed_s": elapsed,
                    "config_hash": spec["config_hash"],
                },
                tmp,
            )

    steps, batch, micro = cfg["steps"], cfg["batch_size"], cfg["micro_batch_size"]
    reset_at_documents = bool((spec["model"].get("ttt") or {}).get("reset_at_documents"))
    seq_tokens = batch * spec["context"]
    print(
        f"[train {tag}] {spec['variant']} {spec['size']} on {device}: {steps} steps x "
        f"{seq_tokens:,} tokens, {sum(p.numel() for p in model.parameters()):,} parameters",
        flush=True,
    )
    model.train()
    segment_start, segment_steps = time.perf_counter(), 0
    with StopSignals() as stop:
        for step in range(start_step, steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tokens, answers, padding = data.sample_batch(
                batch, spec["context"] + 1, spec["seed"], step, cfg["windows"]
            )
            loss_sum = 0.0
            for part, marked, pad in zip(
                *(x.to(device).split(micro) for x in (tokens, answers, padding)), strict=True
            ):
                starts = document_starts(part[:, :-1], data.eos_id) if reset_at_documents else None
                with autocast(device, cfg["dtype"]):
                    losses = model.token_losses(part[:, :-1], part[:, 1:], doc_starts=starts)
                loss = objective = masked_mean(losses, ~pad[:, 1:])
                if answer_weight:
                    answer_mean = masked_mean(losses, marked[:, 1:])
                    objective = (loss + answer_weight * answer_mean) / (1 + answer_weight)
                (objective * part.shape[0] / batch).backward()
                loss_sum += loss.item() * part.shape[0]
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            elapsed += dt
            segment_steps += 1
            curve.append(
                {
                    **identity(spec),
                    "step": step + 1,
                    "tokens": (step + 1) * seq_tokens,
                    "loss": loss_sum / batch,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": seq_tokens / dt,
                    "elapsed_s": elapsed,
                }
            )
            done = step + 1
            if done % cfg["log_every"] == 0 or done == steps or done == start_step + 1:
                rate = (time.perf_counter() - segment_start) / segment_steps
                eta = _format_duration(rate * (steps - done))
                print(
                    f"[train {tag}] step {done}/{steps} loss {curve[-1]['loss']:.4f} lr {lr:.2e} "
                    f"grad {float(grad_norm):.2f} {seq_tokens / dt:,.0f} tok/s "
                    f"elapsed {_format_duration(elapsed)} eta {eta}",
                    flush=True,
                )
            if stop.received is not None:
                save_checkpoint(done)
                print(f"[train {tag}] checkpoint saved at step {done}", flush=True)
                stop.forward()
                name = signal.Signals(stop.received).name
                raise TrainingInterrupted(
                    f"{tag}: stopped by {name} at step {done}/{steps}; "
                    f"checkpoint {paths['checkpoint']} is saved, rerun to resume"
                )
            if done % cfg["checkpoint_every"] == 0 and done < steps:
                save_checkpoint(done)
            if on_step is not None:
                on_step(done)

    with atomic_path(paths["model"]) as tmp:
        torch.save(
            {
                "model_config": spec["model"],
                "state_dict": model.state_dict(),
                "config_hash": spec["config_hash"],
                "step": steps,
            },
            tmp,
        )
    write_table("train_curves", curve, paths["curve"])
    shutil.rmtree(paths["checkpoint"].parent, ignore_errors=True)
    final = curve[-1]["loss"] if curve else float("nan")
    print(f"[train {tag}] done: final loss {final:.4f} in {_format_duration(elapsed)}", flush=True)
    return {"steps": steps, "tokens": steps * seq_tokens, "final_loss": final, "train_s": elapsed}


def load_trained(spec: Mapping[str, Any], device: torch.device) -> torch.nn.Module:
    """The final trained model of a run, in eval mode."""
    path = run_paths(spec)["model"]
    state = torch.load(path, map_location=device, weights_only=False)
    if state["config_hash"] != spec["config_hash"]:
        raise ValueError(f"{path} was trained with a different configuration; retrain the run")
    model = build_model(state["model_config"], seed=None, device=device)
    model.load_state_dict(state["state_dict"])
    return model.eval()
