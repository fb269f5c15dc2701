"""Compile our Triton kernels for sm_90 (H100/H200) with bf16 pointers, without a GPU: Triton's
compiler and the ptxas it ships with, down to a cubin. Prints each kernel's cubin size.
Run by tests/test_kernels.py in a process without TRITON_INTERPRET (which would turn the
kernels into interpreted functions)."""

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ltstudy.ops.lact import triton as lact
from ltstudy.ops.ttt import triton as ttt

BF16, FP32 = "*bf16", "*fp32"


def build(kernel, pointers: dict, ints: list, constants: dict, num_warps: int = 4) -> None:
    signature = {**pointers, **dict.fromkeys(ints, "i32"), **dict.fromkeys(constants, "constexpr")}
    compiled = triton.compile(
        ASTSource(kernel, signature, constants),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps},
    )
    print(kernel.__name__, len(compiled.asm["cubin"]))


build(
    ttt._accumulate_kernel,
    {"w_ptr": FP32, "copy_ptr": BF16, "a_ptr": BF16, "b_ptr": BF16, "scale_ptr": FP32},
    ["C", "D", "F", "stride_ab", "stride_at", "stride_ad", "stride_bb", "stride_bt", "stride_bf"],
    {"WRITE_COPY": True, "PRECISION": "tf32", "BLOCK_D": 128, "BLOCK_F": 128, "BLOCK_C": 32},
    num_warps=8,
)
build(lact._gate_fwd, dict.fromkeys(("h1_ptr", "h3_ptr", "a_ptr"), BF16), ["n"], {"BLOCK": 1024})
build(
    lact._gate_bwd,
    dict.fromkeys(("h1_ptr", "h3_ptr", "da_ptr", "dh1_ptr", "dh3_ptr"), BF16),
    ["n"],
    {"BLOCK": 1024},
)
gates = ("h1_ptr", "h3_ptr", "d_ptr", "a_ptr", "g1_ptr", "g3_ptr")
build(
    lact._update_fwd,
    {**dict.fromkeys(gates, BF16), "lr_ptr": FP32},
    ["rows", "F"],
    {"BLOCK_R": 16, "BLOCK_F": 128},
)
gradients = ("h1_ptr", "h3_ptr", "d_ptr", "da_ptr", "dg1_ptr", "dg3_ptr", "dh1_ptr", "dh3_ptr")
build(
    lact._update_bwd,
    {**dict.fromkeys((*gradients, "dd_ptr"), BF16), "lr_ptr": FP32, "dlr_ptr": FP32},
    ["rows", "F"],
    {"BLOCK_R": 16, "BLOCK_F": 128},
)
