"""Triton expert kernels (interpreter) vs experts_reference, plain weights.

Sizes are deliberately odd for the tiles (H=48, I=80 with BLOCK_N=32, BLOCK_K=32 leaves partial
tiles in N and K). Tolerances: float32 1e-5 (only summation order differs); 16-bit activations
are compared with the float32 reference on the same (rounded) inputs, within 2^-6 relative plus
1e-2 absolute (the kernel rounds the intermediate and the per-slot outputs to 16 bits).
"""

from __future__ import annotations

import pytest
import torch

from mixbuild.errors import UsageError
from mixbuild.model.ops import experts_reference
from mixbuild.plugins.configs import KernelConfig
from tests.plugins.helpers import expert_weights, needs_triton, routing

pytestmark = needs_triton

SMALL = KernelConfig(block_m=16, block_n=32, block_k=32, group_m=1, num_warps=4, num_stages=2)


def run(x, weights, ids, w_gate_up, w_down, config=SMALL, **kwargs):
    from mixbuild.plugins.dispatch import moe_experts_triton

    return moe_experts_triton(x, weights, ids, w_gate_up, w_down, config=config, **kwargs)


def reference32(x, weights, ids, w_gate_up, w_down):
    return experts_reference(x.float(), weights, ids, w_gate_up.float(), w_down.float())


def case(gen, T=9, E=4, k=2, H=48, I=80, dtype=torch.float32, skip=()):
    weights, ids = routing(T, E, k, gen, skip)
    w_gate_up, w_down = expert_weights(E, H, I, gen, dtype)
    x = torch.randn(T, H, generator=gen).to(dtype)
    return x, weights, ids, w_gate_up, w_down


@pytest.mark.parametrize("k", [1, 2, 3])
def test_fp32_matches_reference(gen, k):
    args = case(gen, E=5, k=k)
    out = run(*args)
    assert out.dtype == torch.float32 and out.shape == (9, 48)
    torch.testing.assert_close(out, experts_reference(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_float32_reference(gen, dtype):
    args = case(gen, T=11, k=2, dtype=dtype)
    out = run(*args)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference32(*args), rtol=2 ** -6, atol=1e-2)
    # and is at least as close to it as the 16-bit reference is
    ours = (out.float() - reference32(*args)).abs().max()
    theirs = (experts_reference(*args).float() - reference32(*args)).abs().max()
    assert ours <= theirs * 1.5 + 1e-3


def test_empty_experts_and_single_token(gen):
    args = case(gen, T=6, E=6, k=2, skip=(0, 3, 4))
    torch.testing.assert_close(run(*args), experts_reference(*args), rtol=1e-5, atol=1e-5)
    one = case(gen, T=1, E=4, k=2)
    torch.testing.assert_close(run(*one), experts_reference(*one), rtol=1e-5, atol=1e-5)


def test_zero_tokens_give_an_empty_output(gen):
    x, weights, ids, w_gate_up, w_down = case(gen, T=3)
    out = run(x[:0], weights[:0], ids[:0], w_gate_up, w_down)
    assert out.shape == (0, 48)


@pytest.mark.parametrize("config", [
    KernelConfig(block_m=32, block_n=16, block_k=16, group_m=4, num_warps=4, num_stages=2),
    KernelConfig(block_m=16, block_n=128, block_k=64, group_m=2, num_warps=4, num_stages=2),
    None,                                                   # default config lookup
])
def test_tile_configs_agree(gen, config):
    args = case(gen, T=20, E=3, k=2, H=40, I=56)
    torch.testing.assert_close(run(*args, config=config), experts_reference(*args),
                               rtol=1e-5, atol=1e-5)


def test_strided_hidden_and_int64_ids(gen):
    x, weights, ids, w_gate_up, w_down = case(gen, T=5)
    wide = torch.randn(5, 96, generator=gen)
    x = wide[:, ::2]
    want = experts_reference(x, weights, ids, w_gate_up, w_down)
    torch.testing.assert_close(run(x, weights, ids.long(), w_gate_up, w_down), want,
                               rtol=1e-5, atol=1e-5)


# What the kernel carves out of its workspace for T=7, k=2 (S=14 slots), E=4, H=48, I=80,
# float32, with tiles of M rows; every buffer starts on a 256-byte boundary, and the padded
# slot capacity is S + E*(M-1) rounded up to a multiple of M:
#   M=16:  capacity 14+60=74 -> 80; sorted slots 80*4=320 -> 512, block experts 80/16*4=20 -> 256,
#          padded count 4 -> 256, intermediate 14*80*4=4480 -> 4608, per-slot out 14*48*4=2688
#          -> 2816; total 512+256+256+4608+2816 = 8448
#   M=256: capacity 14+1020=1034 -> 1280; sorted slots 1280*4=5120, block experts 5*4=20 -> 256,
#          256, 4608, 2816; total 5120+256+256+4608+2816 = 13056
# experts_workspace_bytes covers every M in 16..256: the M=256 capacity (5120 bytes) with the
# M=16 block count (1280/16*4=320 -> 512): 5120+512+256+4608+2816 = 13312
CARVED = {16: 8448, 256: 13056}
WORKSPACE_BOUND = 13312


@pytest.mark.parametrize("block_m", sorted(CARVED))
def test_workspace_and_out_buffers(gen, block_m):
    from mixbuild.plugins.dispatch import experts_workspace_bytes

    args = case(gen, T=7, E=4, k=2)
    nbytes = experts_workspace_bytes(7, 2, 4, 48, 80, torch.float32)
    assert nbytes == WORKSPACE_BOUND
    config = KernelConfig(block_m=block_m, block_n=32, block_k=32, group_m=1, num_warps=4,
                          num_stages=2)
    want = experts_reference(*args)
    for size in (nbytes, CARVED[block_m]):      # the bound, and exactly what the kernel takes
        out = torch.full((7, 48), float("nan"))
        got = run(*args, config=config, out=out, workspace=torch.zeros(size, dtype=torch.uint8))
        assert got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match=f"workspace is too small\n  expected: >= {CARVED[block_m]} "):
        run(*args, config=config, workspace=torch.zeros(CARVED[block_m] - 1, dtype=torch.uint8))


def test_bad_inputs_are_usage_errors(gen):
    x, weights, ids, w_gate_up, w_down = case(gen, T=3)
    with pytest.raises(UsageError, match="w_down"):
        run(x, weights, ids, w_gate_up, w_down[:, :, :-1])
    with pytest.raises(UsageError, match="w_gate_up"):
        run(x, weights, ids, w_gate_up.half(), w_down)
    with pytest.raises(UsageError, match="weights"):
        run(x, weights[:, :1], ids, w_gate_up, w_down)
    with pytest.raises(UsageError, match="scheme"):
        run(x, weights, ids, w_gate_up, w_down, scheme="nf4")
    with pytest.raises(UsageError, match="config"):
        run(x, weights, ids, w_gate_up, w_down, config=KernelConfig(block_m=8))
