"""FP8 (W8A8) and INT4 (W4A16) expert kernels (interpreter) vs the dequantize-then-reference path.

What the interpreter verifies: the packed / scaled layouts, scale indexing (per tensor, per channel,
per group, short last group), in-kernel activation quantization, the e4m3 rounding used in the
kernels (emulated bit-exactly; on a GPU the native conversion runs instead), and the math.
Tolerances (outputs are O(1)):
  int4, float32 activations   1e-5 vs experts_reference_quant (weights dequantized exactly)
  int4, bf16 activations      2^-6 rel + 3e-2 abs (weights rounded to bf16 in the kernel)
  fp8 vs an exact model       1e-4 abs (the model also quantizes the SwiGLU output; only the
                              summation order differs: observed 4e-7, but an order change could
                              flip one e4m3 rounding of the intermediate)
  fp8 vs experts_reference_quant  0.08 abs (that reference does not quantize the SwiGLU output;
                              observed 0.04 on outputs up to 1.5)
"""

from __future__ import annotations

import pytest
import torch

from mixbuild.model.ops import experts_reference
from mixbuild.plugins import formats as F
from mixbuild.plugins.configs import KernelConfig
from tests.plugins.helpers import expert_weights, needs_triton, routing, swiglu_amax

pytestmark = needs_triton

SMALL = KernelConfig(block_m=16, block_n=32, block_k=32, group_m=1, num_warps=4, num_stages=2)


def run(*args, **kwargs):
    from mixbuild.plugins.dispatch import moe_experts_triton

    return moe_experts_triton(*args, config=SMALL, **kwargs)


def case(gen, T=9, E=4, k=2, H=48, I=80, dtype=torch.float32):
    weights, ids = routing(T, E, k, gen)
    w_gate_up, w_down = expert_weights(E, H, I, gen)
    x = torch.randn(T, H, generator=gen).to(dtype)
    return x, weights, ids, w_gate_up, w_down


# ---------------------------------------------------------------------------------------- int4

@pytest.mark.parametrize("group, scale_dtype", [(16, torch.float32), (32, torch.float16)])
def test_int4_float32_activations_match_dequantized_reference(gen, group, scale_dtype):
    x, weights, ids, w_gate_up, w_down = case(gen)
    p1, s1 = F.quantize_int4(w_gate_up, group, scale_dtype)     # H=48, G=32: a short last group
    p2, s2 = F.quantize_int4(w_down, group, scale_dtype)
    quant = dict(w_gate_up_scale=s1, w_down_scale=s2, group_size=group)
    out = run(x, weights, ids, p1, p2, scheme="int4", **quant)
    want = F.experts_reference_quant(x, weights, ids, p1, p2, scheme="int4", **quant)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_int4_bf16_activations(gen):
    x, weights, ids, w_gate_up, w_down = case(gen, T=6, k=3, dtype=torch.bfloat16)
    p1, s1 = F.quantize_int4(w_gate_up, 16)
    p2, s2 = F.quantize_int4(w_down, 16)
    quant = dict(w_gate_up_scale=s1, w_down_scale=s2, group_size=16)
    out = run(x, weights, ids, p1, p2, scheme="int4", **quant)
    assert out.dtype == torch.bfloat16
    want = F.experts_reference_quant(x.float(), weights, ids, p1, p2, scheme="int4", **quant)
    torch.testing.assert_close(out.float(), want, rtol=2 ** -6, atol=3e-2)


# ----------------------------------------------------------------------------------------- fp8

def fp8_model(x, weights, ids, q1, s1, q2, s2, a1, a2):
    """What the fp8 kernels compute: both GEMM inputs quantized with per-expert static scales."""
    w1, w2 = F.dequantize_fp8(q1, s1), F.dequantize_fp8(q2, s2)
    E = w1.shape[0]
    a1, a2 = a1.reshape(-1).expand(E), a2.reshape(-1).expand(E)
    out = torch.zeros(x.shape, dtype=torch.float32)
    for slot, e in enumerate(ids.reshape(-1).tolist()):
        token = slot // ids.shape[1]
        xq = F.fake_quantize_fp8(x[token].float(), a1[e])
        gate, up = (w1[e] @ xq).chunk(2)
        h = F.fake_quantize_fp8(torch.nn.functional.silu(gate) * up, a2[e])
        out[token] += weights.reshape(-1)[slot] * (w2[e] @ h)
    return out


def fp8_case(gen, per_channel, act_per_expert, dtype=torch.float32, k=2):
    x, weights, ids, w_gate_up, w_down = case(gen, k=k, dtype=dtype)
    q1, s1 = F.quantize_fp8(w_gate_up, per_channel=per_channel)
    q2, s2 = F.quantize_fp8(w_down, per_channel=per_channel)
    a1 = F.fp8_activation_scale(x)
    a2 = (swiglu_amax(x, w_gate_up) / F.FP8_MAX).reshape(1)
    if act_per_expert:
        a1 = a1 * torch.tensor([1.0, 1.5, 0.75, 2.0])
        a2 = a2 * torch.tensor([1.0, 0.5, 2.0, 1.25])
    quant = dict(w_gate_up_scale=s1, w_down_scale=s2, act_scale_gate_up=a1, act_scale_down=a2)
    return (x, weights, ids, q1, q2), quant


@pytest.mark.parametrize("per_channel, act_per_expert", [(False, False), (True, False),
                                                         (False, True)])
def test_fp8_matches_exact_model(gen, per_channel, act_per_expert):
    (x, weights, ids, q1, q2), quant = fp8_case(gen, per_channel, act_per_expert)
    out = run(x, weights, ids, q1, q2, scheme="fp8", **quant)
    want = fp8_model(x, weights, ids, q1, quant["w_gate_up_scale"], q2, quant["w_down_scale"],
                     quant["act_scale_gate_up"], quant["act_scale_down"])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-4)


def test_fp8_bf16_activations_and_uint8_weights_vs_reference(gen):
    (x, weights, ids, q1, q2), quant = fp8_case(gen, True, False, dtype=torch.bfloat16, k=3)
    out = run(x, weights, ids, q1.view(torch.uint8), q2.view(torch.uint8), scheme="fp8", **quant)
    assert out.dtype == torch.bfloat16
    want = F.experts_reference_quant(x, weights, ids, q1, q2, scheme="fp8",
                                     w_gate_up_scale=quant["w_gate_up_scale"],
                                     w_down_scale=quant["w_down_scale"],
                                     act_scale_gate_up=quant["act_scale_gate_up"])
    torch.testing.assert_close(out.float(), want.float(), rtol=0, atol=0.08)
    plain = experts_reference(x.float(), weights, ids,
                              F.dequantize_fp8(q1, quant["w_gate_up_scale"]),
                              F.dequantize_fp8(q2, quant["w_down_scale"]))
    assert (out.float() - plain).abs().max() < 0.15


def test_fp8_missing_scale_is_a_usage_error(gen):
    from mixbuild.errors import UsageError

    (x, weights, ids, q1, q2), quant = fp8_case(gen, False, False)
    quant.pop("act_scale_down")
    with pytest.raises(UsageError, match="act_scale_down"):
        run(x, weights, ids, q1, q2, scheme="fp8", **quant)


# ------------------------------------------------------------------------ e4m3 rounding kernel

def test_emulated_e4m3_rounding_is_bit_exact():
    grid = torch.arange(0, 256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    grid = grid[grid >= 0]
    midpoints = (grid[1:] + grid[:-1]) / 2                   # exact ties: round to even
    nudged = torch.cat([midpoints * (1 + 2 ** -20), midpoints * (1 - 2 ** -20)])
    spread = torch.logspace(-12, 3, 3000)
    values = torch.cat([grid, midpoints, nudged, spread, torch.tensor([500.0, 1e6, 2 ** -10])])
    values = torch.cat([values, -values])
    want = values.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    from tests.plugins.e4m3_kernel import e4m3_kernel_bits

    got = e4m3_kernel_bits(values)
    bad = got != want
    assert not bad.any(), f"{values[bad][:8].tolist()} -> {got[bad][:8].tolist()}"
