"""A test kernel around the kernels' float32 -> e4m3 conversion (imports triton: import lazily)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixbuild.plugins.triton_kernels import _e4m3_bits


@triton.jit
def _convert(x_ptr, y_ptr, n, EMULATE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(y_ptr + offs, _e4m3_bits(x, EMULATE), mask=offs < n)


def e4m3_kernel_bits(values: torch.Tensor, emulate: bool = True) -> torch.Tensor:
    """float32 [n] -> uint8 [n] e4m3 bit patterns computed by _e4m3_bits."""
    out = torch.empty(values.numel(), dtype=torch.uint8, device=values.device)
    _convert[(triton.cdiv(values.numel(), 4096),)](values, out, values.numel(), EMULATE=emulate,
                                                   BLOCK=4096)
    return out
