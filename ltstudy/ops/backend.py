"""Which implementation of an op runs: the setting `model.kernels` and the tensors' device.

    reference  the plain torch forms everywhere (the CPU default, and what every fast path is
               tested against);
    triton     the fast kernels (our own Triton, flash-linear-attention's, FlexAttention);
               on the CPU only under TRITON_INTERPRET=1, which is how the tests run them;
    auto       the fast kernels on a GPU, the reference elsewhere.

A library kernel that is not installed falls back to the reference under `auto` (with one
warning) and is an error under `triton`.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from functools import cache, reduce

import torch
from torch import Tensor

KERNELS = ("auto", "reference", "triton")


def interpreting() -> bool:
    """Triton runs kernels on CPU tensors, one program at a time (tests only: slow)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_fast(kernels: str, x: Tensor) -> bool:
    """Whether an op on tensors like `x` takes its fast path under the setting `kernels`."""
    if kernels not in KERNELS:
        raise ValueError(f"model.kernels is {kernels!r}; expected one of {', '.join(KERNELS)}")
    if kernels == "reference":
        return False
    if kernels == "auto":
        return x.is_cuda and has_module("triton")
    if not has_module("triton"):
        raise RuntimeError("model.kernels: triton needs the triton package (pip install triton)")
    if not x.is_cuda and not interpreting():
        raise RuntimeError(
            "model.kernels: triton needs a CUDA GPU (or TRITON_INTERPRET=1 to test on the CPU)"
        )
    return True


@cache
def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def library(kernels: str, x: Tensor, module: str, package: str) -> bool:
    """Whether a library's kernels (e.g. module `fla`, package `fla-core`) run for tensors like
    `x`: the fast path is chosen and the library is installed."""
    if not use_fast(kernels, x):
        return False
    if has_module(module):
        return True
    if kernels == "triton":
        raise RuntimeError(f"model.kernels: triton needs {package} (pip install {package})")
    _warn_missing(package)
    return False


@cache
def _warn_missing(package: str) -> None:
    warnings.warn(f"{package} is not installed: its ops run the reference form", stacklevel=3)


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """The one dtype a kernel's operands go in as: autocast's when it is on (what torch's own
    matmuls and SDPA would use; kernels outside torch are not cast by autocast), else the
    inputs' promoted type. Triton's dots need the same dtype on both sides."""
    device = xs[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return reduce(torch.promote_types, (x.dtype for x in xs))
