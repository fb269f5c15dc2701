"""What training writes to disk: resumable sharded checkpoints and the consolidated model.

Sharded checkpoints (`torch.distributed.checkpoint`) hold the model, the optimizer and the
training state (step, curve so far, RNG); each rank writes its own shards, and a checkpoint
loads onto any world size (DCP reshards). A checkpoint directory appears complete or not at all:
it is written under a temporary name and renamed once every rank has finished.

The final model is one consolidated safetensors file, written by rank 0 one parameter at a time
(the header is computed from the shapes first), with the model config in its metadata, so
evaluation and users load it without a process group and without unpickling anything.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import struct
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ltstudy.io import atomic_path, read_json, write_json
from ltstudy.parallel.distributed import World
from ltstudy.parallel.materialize import Source, full_parameters
from ltstudy.parallel.parallelize import canonical_name

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
STEP_DIR = re.compile(r"^step-(\d+)$")


# ---- consolidated model (safetensors) ----------------------------------------------------


def _header(
    entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping, path
) -> bytes:
    header: dict[str, Any] = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: cannot write {name}, of dtype {dtype}")
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes


def export_model(
    model: nn.Module, path: str | Path, metadata: Mapping[str, Any], world: World
) -> None:
    """Write the consolidated parameters as safetensors: every rank takes part in each
    parameter's all-gather, rank 0 writes. A write that fails on rank 0 (a full disk, say) is
    made known to every rank at once, so that none waits on a gather that will not come."""
    entries = [
        (canonical_name(name), param.dtype, tuple(param.shape))
        for name, param in model.named_parameters()
    ]
    header = _header(entries, metadata, path)  # on every rank: a bad dtype fails everywhere
    with contextlib.ExitStack() as files:
        out, failure = None, None
        if world.is_main:
            try:
                out = files.enter_context(open(files.enter_context(atomic_path(path)), "wb"))
                out.write(struct.pack("<Q", len(header)) + header)
            except OSError as err:
                failure = err
        _raise_on_any_rank(failure, path, world)
        for _, value in full_parameters(model):  # one parameter in memory at a time
            if out is not None and failure is None:
                try:
                    out.write(value.contiguous().cpu().view(torch.uint8).numpy().data)
                except OSError as err:
                    failure = err
            _raise_on_any_rank(failure, path, world)


def _raise_on_any_rank(failure: BaseException | None, path: str | Path, world: World) -> None:
    if world.sum(float(failure is not None)) > 0:
        raise failure or OSError(f"rank 0 could not write {path}; see its log")


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def safetensors_source(path: str | Path) -> Source:
    """A materialize() source reading tensors lazily (memory-mapped) from a safetensors file
    that holds every parameter (a missing one is an error naming the file)."""
    from safetensors import safe_open

    handle = safe_open(str(path), framework="pt")
    names = set(handle.keys())

    def source(name: str, param: torch.Tensor) -> torch.Tensor:
        if name not in names:
            raise ValueError(f"{path} has no parameter {name!r}")
        return handle.get_tensor(name)

    return source


# ---- sharded checkpoints (torch.distributed.checkpoint) ------------------------------------


@contextlib.contextmanager
def _single_process_quiet(world: World) -> Iterator[None]:
    """DCP warns that it assumes one process when there is no process group: that is meant."""
    with warnings.catch_warnings():
        if not world.grouped:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / "train_state.json").is_file()]


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: Mapping[str, Any],
    world: World,
) -> Path:
    """Write step `step`'s checkpoint on every rank; keep only the newest one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(root)
    final = root / f"step-{step:08d}"
    staging = root / f".step-{step:08d}.partial"
    if world.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    world.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "rng": _rng_state()}
    with _single_process_quiet(world):
        dcp.save(state, checkpoint_id=str(staging), no_dist=not world.grouped)
    world.barrier()
    if world.is_main:
        write_json(
            staging / "train_state.json", {**train_state, "step": step, "world_size": world.size}
        )
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in checkpoint_dirs(root):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def latest_checkpoint(root: str | Path, config_hash: str) -> tuple[Path, dict] | None:
    """The newest complete checkpoint written by this configuration, with its training state."""
    for path in reversed(checkpoint_dirs(root)):
        state = read_json(path / "train_state.json")
        if state.get("config_hash") == config_hash:
            return path, state
        print(f"[train] ignoring {path}: written by a different configuration", flush=True)
    return None


def _rng_state() -> dict[str, torch.Tensor]:
    """torch's generators. Every rank seeds them alike and nothing in training draws from them
    (batches and initial weights have seeded generators of their own); they are kept so that
    anything that does (dropout, say) resumes as it would have run. Rank 0's are saved."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World
) -> None:
    """Load a sharded checkpoint into the model and optimizer of any world size (and the RNG
    state rank 0 saved)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "rng": _rng_state()}
    with _single_process_quiet(world):
        dcp.load(state, checkpoint_id=str(path), no_dist=not world.grouped)
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
