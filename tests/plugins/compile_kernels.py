"""Compile the MoE kernels to CUDA binaries without a GPU (Triton's frontend and bundled ptxas).

Run as a script in a process without TRITON_INTERPRET (the interpreter replaces @triton.jit):
    python -m tests.plugins.compile_kernels [compute capability, default 90]
Prints one line per compiled variant and exits non-zero on the first compile error.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mixbuild.plugins import triton_kernels as K

BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}
# scheme, activation, weight, intermediate, weight-scale pointer types, per channel
VARIANTS = [(0, "*bf16", "*bf16", "*bf16", "*bf16", False),
            (1, "*bf16", "*u8", "*u8", "*fp32", True),
            (2, "*fp16", "*u8", "*fp16", "*fp16", False)]


def compile_one(fn, types: dict, constants: dict, target: GPUTarget) -> None:
    signature = {name: "constexpr" if name in constants else types.get(name, "i32")
                 for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constants), target=target,
                            options={"num_warps": 4, "num_stages": 3})
    print(f"compiled {fn.__name__} {constants} -> {len(kernel.asm['cubin'])} bytes of cubin")


def main(capability: int) -> None:
    target = GPUTarget("cuda", capability, 32)
    compile_one(K.moe_gate_kernel, {"logits_ptr": "*bf16", "weights_ptr": "*fp32",
                                    "ids_ptr": "*i32"},
                {"TOP_K": 2, "NORMALIZE": True, "BLOCK_T": 64, "BLOCK_E": 8}, target)
    for scheme, act, weight, inter, scale, per_channel in VARIANTS:
        common = {"sorted_slots_ptr": "*i32", "block_expert_ptr": "*i32",
                  "num_padded_ptr": "*i32", "b_scale_ptr": scale, "a_scale_ptr": "*fp32"}
        flags = dict(BLOCKS, SCHEME=scheme, PER_CHANNEL=per_channel, DOT_FP32=False)
        compile_one(K.gate_up_kernel, dict(common, a_ptr=act, b_ptr=weight, c_ptr=inter,
                                           c_scale_ptr="*fp32"),
                    dict(flags, EMULATE_FP8=False), target)
        compile_one(K.down_kernel, dict(common, a_ptr=inter, b_ptr=weight, c_ptr=act,
                                        routing_ptr="*fp32"), flags, target)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
