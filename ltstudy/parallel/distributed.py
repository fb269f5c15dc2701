"""The process group of a job: one process per GPU (or per CPU rank), ranks from the launcher.

Ranks come from torchrun's variables (RANK, WORLD_SIZE, ...) if set, else from submitit's
JobEnvironment (Slurm's variables, or the local executor's), which also gives the rendezvous
address. A single process on the CPU runs without a process group (the plain model); a single
GPU joins a one-rank group, so that FSDP2's mixed precision applies there as on many GPUs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

CPU = torch.device("cpu")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    nodes: int = 1
    device: torch.device = CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        """Whether a process group exists (then FSDP2 shards the model over it)."""
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.grouped:
            dist.barrier()

    def sum(self, value: float) -> float:
        """A float summed over all ranks."""
        if not self.grouped:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return float(t.item())

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _submitit_ranks() -> dict[str, str] | None:
    """The torch.distributed variables of a submitit job with more than one task, or None."""
    try:
        import submitit

        env = submitit.JobEnvironment()
    except (ImportError, RuntimeError):
        return None
    if env.num_tasks == 1:
        return None
    rendezvous = submitit.helpers.TorchDistributedEnvironment()
    return {
        "RANK": str(rendezvous.rank),
        "WORLD_SIZE": str(rendezvous.world_size),
        "LOCAL_RANK": str(rendezvous.local_rank),
        "LOCAL_WORLD_SIZE": str(rendezvous.local_world_size),
        "MASTER_ADDR": rendezvous.master_addr,
        "MASTER_PORT": str(rendezvous.master_port),
    }


def _launcher_ranks() -> dict[str, str] | None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    return _submitit_ranks()


def init_world(timeout_min: int = 30) -> World:
    """Join the job's process group (creating a one-rank group on a single GPU)."""
    ranks = _launcher_ranks()
    cuda = torch.cuda.is_available()
    if ranks is None and not cuda:
        return World()
    if ranks is None:
        ranks = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    rank, size = int(ranks["RANK"]), int(ranks["WORLD_SIZE"])
    local_rank = int(ranks.get("LOCAL_RANK", 0))
    per_node = int(ranks.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_WORLD_SIZE", size)))
    timeout = datetime.timedelta(minutes=timeout_min)
    if cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if size == 1:  # in-process store: no port to find, nothing to rendezvous with
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        os.environ.update({k: v for k, v in ranks.items() if k.startswith("MASTER_")})
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout)
    return World(rank, size, local_rank, max(1, size // max(1, per_node)), device)


def close_world(world: World) -> None:
    if world.grouped:
        dist.destroy_process_group()


@contextlib.contextmanager
def joined_world() -> Iterator[World]:
    world = init_world()
    try:
        yield world
    finally:
        close_world(world)
