"""flash-linear-attention adapters (`ltstudy.ops.{gla,delta_rule}.fla`) against our torch forms.

Every adapter, values and gradients (q, k, v, g, β, initial state), with an initial state and a
length that is no multiple of any chunk (100: two of fla's 64-token chunks); and the dispatch
(`kernels="triton"`) reaching them. On a GPU in fp32 and bf16 (and as the models call them under
bf16 autocast); on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set by conftest where
there is no GPU) in fp32 only, the interpreter's bf16 dots being wrong.

The reference runs in float64 on the same (rounded) inputs. Errors are relative, in norm over
the whole tensor: fp32 within 1e-4 (fla's own is ~1e-6 with IEEE fp32 dots; a wrong gate, scale
or state layout is off by O(1)); bf16 within 5e-2 (fla rounds its operands, outputs and
recomputed intermediates to bf16, 2^-9 each, and gradients through the gate add up over time).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ltstudy.ops import backend
from ltstudy.ops.delta_rule import chunk as gdn_ref
from ltstudy.ops.delta_rule import gated_delta_rule
from ltstudy.ops.gla import chunk as gla_ref
from ltstudy.ops.gla import gla

pytest.importorskip("fla")

import triton.language as tl
from triton.runtime.autotuner import Autotuner

from ltstudy.ops.delta_rule import fla as gdn_fla
from ltstudy.ops.gla import fla as gla_fla

SCALE = 0.7  # not fla's default K^-0.5, so a scale that is not passed shows
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
SHAPE = {"cpu": (1, 2, 100, 16, 16), "cuda": (2, 3, 100, 32, 64)}  # B, H, T, K, V

# op: (adapter, reference, gate, has a backward); gate "key" [B,H,T,K], "head" [B,H,T],
# "delta" a per-head gate and β
OPS = {
    "chunk_gla": (gla_fla.chunk_gla, gla_ref.chunk_gla, "key", True),
    "chunk_scalar_gla": (gla_fla.chunk_scalar_gla, gla_ref.chunk_scalar_gla, "head", True),
    "recurrent_gla_key": (gla_fla.recurrent_gla, gla_ref.recurrent_gla, "key", True),
    "recurrent_gla_head": (gla_fla.recurrent_gla, gla_ref.recurrent_gla, "head", True),
    "chunk_gated_delta_rule": (
        gdn_fla.chunk_gated_delta_rule,
        gdn_ref.chunk_gated_delta_rule,
        "delta",
        True,
    ),
    # fla's fused recurrent gated delta rule has no backward: the decode step only
    "recurrent_gated_delta_rule": (
        gdn_fla.recurrent_gated_delta_rule,
        gdn_ref.recurrent_gated_delta_rule,
        "delta",
        False,
    ),
}

# gate: (entry, adapters' module, chunk adapter, recurrent adapter, token-by-token reference)
DISPATCH = {
    "key": (gla, gla_fla, "chunk_gla", "recurrent_gla", gla_ref.recurrent_gla),
    "head": (gla, gla_fla, "chunk_scalar_gla", "recurrent_gla", gla_ref.recurrent_gla),
    "delta": (
        gated_delta_rule,
        gdn_fla,
        "chunk_gated_delta_rule",
        "recurrent_gated_delta_rule",
        gdn_ref.recurrent_gated_delta_rule,
    ),
}

ON_GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
UNDER_INTERPRETER = pytest.mark.skipif(
    torch.cuda.is_available() or not backend.interpreting(),
    reason="fla on CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1, no GPU)",
)
RUNS = [
    pytest.param("cpu", torch.float32, marks=UNDER_INTERPRETER, id="interpreter-fp32"),
    pytest.param("cuda", torch.float32, marks=ON_GPU, id="gpu-fp32"),
    pytest.param("cuda", torch.bfloat16, marks=ON_GPU, id="gpu-bf16"),
]


def _tensor_range(*bounds: object) -> Iterator[tl.tensor]:
    """`range` with Triton scalars for indices, as compiled kernels have them: the interpreter
    gives Python ints, on which fla's chunk kernels fail (`i_t.to(tl.int64)`)."""
    from triton.runtime.interpreter import interpreter_semantic

    ends = [b.handle.data.item() if isinstance(b, tl.tensor) else int(b) for b in bounds]
    for i in range(*ends):
        yield interpreter_semantic.to_tensor(i)


def run_on(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Let fla's kernels run exactly on `device`. GPU: IEEE fp32 dots, not TF32 (~1e-3; only
    for kernels first compiled after this: Triton's in-memory cache ignores the variable).
    CPU: the interpreter needs loop indices as Triton scalars in fla's kernel modules, and each
    autotuned kernel pinned to its first valid config (Triton's autotuner times configs through
    the GPU driver)."""
    if device == "cuda":
        monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
        return
    prune = Autotuner.prune_configs
    monkeypatch.setattr(Autotuner, "prune_configs", lambda self, kwargs: prune(self, kwargs)[:1])
    for name, module in list(sys.modules.items()):
        if name.startswith("fla.ops."):
            monkeypatch.setattr(module, "range", _tensor_range, raising=False)


def make_inputs(
    gate: str, shape: tuple[int, ...], device: str, dtype: torch.dtype, seed: int = 0
) -> tuple[list[Tensor], Tensor]:
    """([q, k, v, g] (+ β for "delta"), initial state); decays mild enough (about exp(-0.05)
    a token) that the initial state still shows at the end."""
    B, H, T, K, V = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen)

    xs = [randn(B, H, T, K), F.normalize(randn(B, H, T, K), dim=-1), randn(B, H, T, V)]
    xs.append(F.logsigmoid(randn(B, H, T, K) + 3 if gate == "key" else randn(B, H, T) + 3))
    if gate == "delta":
        xs.append(torch.sigmoid(randn(B, H, T)))
    return [x.to(device, dtype) for x in xs], randn(B, H, K, V).to(device, dtype)


def assert_near(got: Tensor, want: Tensor, tol: float, what: str) -> None:
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < tol, f"{what}: relative error {err:.1e} (tolerance {tol:.0e})"


def check_op(op: str, device: str, dtype: torch.dtype, autocast: bool = False) -> None:
    """The adapter's output, final state (float32) and, where fla has a backward, gradients
    against the reference on the same inputs. With `autocast` the inputs are fp32 but q and k,
    bf16 (as the models pass them under bf16 autocast), and the adapter runs under autocast."""
    adapter, reference, gate, grads = OPS[op]
    xs, state = make_inputs(gate, SHAPE[device], device, dtype)
    if autocast:
        xs[:2] = [x.bfloat16() for x in xs[:2]]
    leaves = [x.requires_grad_(grads) for x in (*xs, state)]
    ref_leaves = [x.detach().double().requires_grad_(grads) for x in leaves]
    with torch.set_grad_enabled(grads), torch.autocast(device, torch.bfloat16, enabled=autocast):
        o, S = adapter(*leaves[:-1], SCALE, leaves[-1])
    with torch.set_grad_enabled(grads):
        o_ref, S_ref = reference(*ref_leaves[:-1], SCALE, ref_leaves[-1])
    out_dtype = torch.bfloat16 if autocast else dtype
    assert o.dtype == out_dtype and S.dtype == torch.float32
    tol = TOLERANCE[out_dtype]
    assert_near(o, o_ref, tol, "output")
    assert_near(S, S_ref, tol, "final state")
    if not grads:
        return
    gen = torch.Generator().manual_seed(1)
    do, dS = (torch.randn(x.shape, generator=gen).to(device, torch.float64) for x in (o, S))
    ((o.double() * do).sum() + (S.double() * dS).sum()).backward()
    ((o_ref * do).sum() + (S_ref * dS).sum()).backward()
    names = [*("q", "k", "v", "g", "beta")[: len(xs)], "initial state"]
    for name, leaf, ref_leaf in zip(names, leaves, ref_leaves, strict=True):
        assert_near(leaf.grad, ref_leaf.grad, tol, f"gradient of {name}")


@pytest.mark.parametrize(("device", "dtype"), RUNS)
@pytest.mark.parametrize("op", list(OPS))
def test_adapter_matches_the_reference(op, device, dtype, monkeypatch):
    run_on(device, monkeypatch)
    check_op(op, device, dtype)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adapter_under_bf16_autocast_on_the_gpu(op):
    """fla's dots need one dtype: mixed q/k and v (Mamba2's v is fp32 there) run in bf16."""
    check_op(op, "cuda", torch.float32, autocast=True)


@pytest.mark.parametrize(("device", "dtype"), RUNS[:2])
@pytest.mark.parametrize("T", [100, 1])
@pytest.mark.parametrize("gate", list(DISPATCH))
def test_dispatch_reaches_fla(gate, T, device, dtype, monkeypatch):
    """`gla` / `gated_delta_rule` with kernels="triton" call the fla adapter for the gate and
    the length (one token: the recurrent form) and give the reference's result."""
    run_on(device, monkeypatch)
    entry, module, chunk_name, step_name, reference = DISPATCH[gate]
    name = step_name if T == 1 else chunk_name
    adapter, calls = getattr(module, name), []

    def spy(*args: Tensor) -> tuple[Tensor, Tensor]:
        calls.append(name)
        return adapter(*args)

    monkeypatch.setattr(module, name, spy)
    B, H, _, K, V = SHAPE[device]
    xs, state = make_inputs(gate, (B, H, T, K, V), device, dtype)
    with torch.no_grad():
        o, S = entry(*xs, SCALE, state, kernels="triton")
        o_ref, S_ref = reference(*(x.double() for x in xs), SCALE, state.double())
    assert calls == [name]
    assert_near(o, o_ref, TOLERANCE[dtype], "output")
    assert_near(S, S_ref, TOLERANCE[dtype], "final state")
