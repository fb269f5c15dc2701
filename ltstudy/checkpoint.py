"""What training writes to disk: resumable sharded checkpoints and the consolidated model.

Sharded checkpoints (`torch.distributed.checkpoint`) hold the model, the optimizer and the RNG
state, and the rest of the training state (step, curve so far, file sizes) as JSON in
`train_state.json`; each rank writes its own shards, and a checkpoint loads onto any world size
(DCP reshards). A checkpoint directory appears complete or not at all: it is written under a
temporary name and renamed once every rank has finished. The newest two are kept. Loading one
runs no code from it (DCP's own reader would unpickle its metadata) and checks the saved size
of every file first; one that does not load is renamed `step-N.bad`, with a warning, and
training resumes from the one before it, or from scratch.

The final model is one consolidated safetensors file, written by rank 0 one parameter at a time
(the header is computed from the shapes first), with the model config in its metadata, so
evaluation and users load it without a process group and without unpickling anything.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import pickle
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

DISK_FULL_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full
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


# What DCP's `.metadata` pickle refers to (besides torch's dtypes): its own dataclasses, shapes,
# layouts and the path it was saved to. Nothing here runs code when called with any arguments.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata, refusing every global but the few it needs: DCP itself would
    `pickle.load` the file, so a crafted checkpoint could run anything on resume."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _METADATA_GLOBALS and not dtype:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def _safe_reader(path: Path) -> Any:
    """DCP's file reader, unpickling its metadata with `_MetadataUnpickler` (the tensors are
    read with `torch.load(weights_only=True)` already). DCP is imported where it is used, here
    and below: importing it costs a second."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            file = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(file, "rb") as stream:
                try:
                    metadata = _MetadataUnpickler(stream).load()
                except Exception as err:
                    raise pickle.UnpicklingError(f"{file}: {err}") from err
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _safe_planner() -> Any:
    """DCP's load planner, reading non-tensor values (the optimizer's hyperparameters) with
    `torch.load(weights_only=True)`; DCP's own uses `weights_only=False`."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                plain = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as err:
                file = self.metadata.storage_data[read_item.storage_index].relative_path
                lines = str(err).splitlines()
                detail = next((line for line in lines if "GLOBAL" in line), lines[0])
                raise pickle.UnpicklingError(
                    f"{file}: {read_item.dest_index.fqn} is not a plain value: {detail}"
                ) from err
            checked = io.BytesIO()  # plain values, so DCP's unpickling of them runs nothing
            torch.save(plain, checked)
            checked.seek(0)
            super().load_bytes(read_item, checked)

    return SafePlanner()


@contextlib.contextmanager
def _single_process_quiet(world: World) -> Iterator[None]:
    """DCP warns that it assumes one process when there is no process group: that is meant."""
    with warnings.catch_warnings():
        if not world.grouped:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """The checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(f.relative_to(folder)): f.stat().st_size
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: Mapping[str, Any],
    world: World,
) -> Path:
    """Write step `step`'s checkpoint on every rank; keep it and the one before it (a fallback
    should it not load). Its training state records the size of every file, so that a
    truncated one is found before loading."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
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
    try:
        with _single_process_quiet(world):
            dcp.save(state, checkpoint_id=str(staging), no_dist=not world.grouped)
    except (Exception, CheckpointException) as err:  # DCP raises the same on every rank
        free = shutil.disk_usage(root).free
        if world.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        if free < DISK_FULL_BYTES:  # torch reports a short write as "unexpected pos ..."
            raise OSError(
                errno.ENOSPC, f"No space left on device: writing checkpoint {staging} ({err})"
            ) from err
        raise
    world.barrier()
    if world.is_main:
        files = _file_sizes(staging)
        write_json(
            staging / "train_state.json",
            {**train_state, "step": step, "world_size": world.size, "files": files},
        )
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        found = checkpoint_dirs(root)
        before = found[: found.index(final)]
        for old in found:
            if old not in (final, *before[-1:]):  # later steps: another configuration's
                shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def remove_checkpoints(root: str | Path) -> None:
    """Remove a finished run's checkpoints, but not those set aside as bad (`step-N.bad`):
    the warning that named them said where they are."""
    root = Path(root)
    if not root.is_dir():
        return
    for path in root.iterdir():
        if ".bad" not in path.name:
            shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        root.rmdir()  # only if nothing was set aside


def _rng_state() -> dict[str, torch.Tensor]:
    """torch's generators. Every rank seeds them alike and nothing in training draws from them
    (batches and initial weights have seeded generators of their own); they are kept so that
    anything that does (dropout, say) resumes as it would have run. Rank 0's are saved."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _read_train_state(path: Path) -> dict:
    """The checkpoint's training state, once its files are all there at their saved sizes."""
    file = path / "train_state.json"
    try:
        state = read_json(file)
    except ValueError as err:  # not JSON, or not UTF-8
        raise ValueError(f"{file}: {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{file}: not a JSON object")
    for name, size in state.get("files", {}).items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            found = "missing" if actual is None else f"{actual:,} bytes"
            raise OSError(f"{path / name} is {found}, saved as {size:,} bytes")
    return state


def _reason(err: BaseException) -> str:
    """One line: the first rank's error for a DCP failure (which holds every rank's)."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    return f"{type(err).__name__}: {err}".splitlines()[0]


def _agree(failure: str | None, path: Path, world: World) -> bool:
    """Whether every rank succeeded. If not, rank 0 moves the checkpoint aside (renamed
    `step-N.bad`: neither loaded again nor deleted) with a one-line warning naming it and why."""
    if world.sum(float(failure is not None)) == 0:
        return True
    main_failed = world.sum(float(world.is_main and failure is not None)) > 0
    if failure and not main_failed:  # rank 0 cannot say why: this rank does
        print(f"[train] rank {world.rank}: checkpoint {path} does not load ({failure})", flush=True)
    if world.is_main:
        aside, n = path.with_name(f"{path.name}.bad"), 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.bad{n}")
        try:
            path.rename(aside)
            done = f"moved to {aside}"
        except OSError as err:  # the other ranks wait for this one: never raise here
            done = f"could not move it aside: {err}"
        why = failure or "failed on another rank; see its log"
        print(f"[train] warning: checkpoint {path} does not load ({why}); {done}", flush=True)
    world.barrier()
    return False


def resumable_checkpoints(
    root: str | Path, config_hash: str, world: World
) -> Iterator[tuple[Path, dict]]:
    """This configuration's checkpoints whose files are intact, newest first, with their
    training states. A damaged one is moved aside (see `_agree`) and skipped."""
    for path in reversed(checkpoint_dirs(root)):
        state, failure = None, None
        try:
            state = _read_train_state(path)
        except Exception as err:
            failure = _reason(err)
        if not _agree(failure, path, world):
            continue
        if state.get("config_hash") != config_hash:
            if world.is_main:
                print(f"[train] ignoring {path}: written by a different configuration", flush=True)
            continue
        yield path, state


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World
) -> bool:
    """Load a sharded checkpoint into the model and optimizer of any world size (and the RNG
    state rank 0 saved), unpickling nothing but plain values and DCP's metadata classes. On
    any rank's failure it is moved aside (see `_agree`) and False returned: the model and
    optimizer may then be half-loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    failure = None
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "rng": _rng_state()}
        with _single_process_quiet(world):
            dcp.load(
                state,
                storage_reader=_safe_reader(path),
                planner=_safe_planner(),
                no_dist=not world.grouped,
            )
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    except (Exception, CheckpointException) as err:
        failure = _reason(err)
    return _agree(failure, path, world)
