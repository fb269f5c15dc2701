"""Device, threads, autocast and peak-memory helpers shared by training and evaluation."""

from __future__ import annotations

import contextlib
import os
import resource

import torch


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def configure_threads(cpus: int | None) -> None:
    """On the CPU use the cores the job asked for (the default may oversubscribe)."""
    if cpus:
        torch.set_num_threads(max(1, min(cpus, os.cpu_count() or cpus)))


def autocast(device: torch.device, dtype: str):
    if device.type == "cuda" and dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def resident_peak_mb() -> float:
    """This process's peak resident set in MB. On Linux it is VmHWM, that of this process's own
    address space: ru_maxrss would also hold the parent's peak, which a child inherits through
    fork and exec."""
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(megabytes, kind): CUDA's peak allocation, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resident_peak_mb(), "cpu_peak_rss"


# Dense bf16 tensor-core peaks from NVIDIA's and AMD's datasheets (TFLOP/s, without sparsity),
# matched in order against torch.cuda.get_device_name: the first name it contains wins.
DATASHEET_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
)


def datasheet_peak_tflops(name: str) -> float | None:
    """The datasheet's dense bf16 peak of a GPU by its device name (None if not listed)."""
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
