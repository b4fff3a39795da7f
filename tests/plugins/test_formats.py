"""Quantized layouts: packing, quantize / dequantize round trips, the reference path."""

from __future__ import annotations

import pytest
import torch

from mixbuild.errors import UsageError
from mixbuild.model.ops import experts_reference
from mixbuild.plugins import formats as F
from tests.plugins.helpers import expert_weights, routing


def test_int4_packing_layout_is_low_nibble_first():
    q = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    packed = F.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0xE1, 0x87]]
    assert torch.equal(F.unpack_int4(packed), q)


def test_int4_packing_round_trips_every_value_pair():
    values = torch.arange(-8, 8, dtype=torch.int8)
    q = torch.cartesian_prod(values, values).reshape(1, -1)
    assert torch.equal(F.unpack_int4(F.pack_int4(q)), q)


def test_int4_bytes_equal_onnx_int4_raw_data():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from onnx import numpy_helper

    q = torch.randint(-8, 8, (2, 3, 8), generator=torch.Generator().manual_seed(0))
    onnx_tensor = numpy_helper.from_array(q.numpy().astype(ml_dtypes.int4), "w")
    assert onnx_tensor.raw_data == F.pack_int4(q).numpy().tobytes()


def test_int4_odd_k_is_rejected():
    with pytest.raises(UsageError, match="even"):
        F.pack_int4(torch.zeros(1, 3, dtype=torch.int8))
    with pytest.raises(UsageError, match="even"):
        F.quantize_int4(torch.zeros(1, 2, 5), group_size=4)


@pytest.mark.parametrize("K, group", [(64, 16), (48, 32), (80, 128)])
def test_int4_round_trip_error_is_at_most_half_a_step(gen, K, group):
    w = torch.randn(2, 5, K, generator=gen)
    packed, scale = F.quantize_int4(w, group, scale_dtype=torch.float32)
    assert packed.shape == (2, 5, K // 2)
    assert scale.shape == (2, 5, -(-K // group))
    back = F.dequantize_int4(packed, scale, group)
    step = scale.repeat_interleave(group, dim=-1)[..., :K]
    assert torch.all((back - w).abs() <= step / 2 + 1e-6)


def test_int4_representable_weights_are_exact(gen):
    q = torch.randint(-7, 8, (2, 4, 32), generator=gen).float()   # amax / 7 is the scale
    q[..., ::16] = 7.0                            # every group reaches the positive max
    scale = torch.tensor([0.5, 0.25]).repeat(2, 4, 1)
    w = q * scale.repeat_interleave(16, dim=-1)
    packed, got_scale = F.quantize_int4(w, 16, scale_dtype=torch.float32)
    assert torch.equal(got_scale, scale)
    assert torch.equal(F.dequantize_int4(packed, got_scale, 16), w)


def test_int4_dequantize_checks_the_group_count():
    packed = torch.zeros(1, 2, 16, dtype=torch.uint8)
    with pytest.raises(UsageError, match="groups"):
        F.dequantize_int4(packed, torch.ones(1, 2, 3), group_size=16)


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_round_trip_is_within_e4m3_precision(gen, per_channel):
    w = torch.randn(3, 6, 40, generator=gen)
    q, scale = F.quantize_fp8(w, per_channel=per_channel)
    assert q.dtype == torch.float8_e4m3fn
    assert scale.shape == ((3, 6) if per_channel else (3,))
    back = F.dequantize_fp8(q, scale)
    full = scale[:, :, None] if per_channel else scale[:, None, None]
    # 3 mantissa bits: relative error <= 2^-4 for normals, absolute <= 2^-10 * scale below 2^-6
    assert torch.all((back - w).abs() <= w.abs() / 16 + full * 2.0 ** -10 + 1e-7)
    assert torch.equal(F.dequantize_fp8(q.view(torch.uint8), scale), back)
    assert back.abs().amax() <= (full * F.FP8_MAX).amax() * (1 + 1e-6)


def test_fp8_zero_expert_gets_unit_scale():
    q, scale = F.quantize_fp8(torch.zeros(2, 3, 4))
    assert torch.equal(scale, torch.ones(2)) and torch.all(q.float() == 0)


def test_fp8_activation_quantization_saturates_and_rounds_to_nearest_even():
    scale = torch.tensor(1.0)
    x = torch.tensor([1000.0, -1000.0, 1.0625, 1.1875, 0.0])
    # 1.0625 lies halfway between 1.0 and 1.125 (even mantissa: 1.0); 1.1875 between 1.125, 1.25
    assert F.fake_quantize_fp8(x, scale).tolist() == [448.0, -448.0, 1.0, 1.25, 0.0]
    assert F.fp8_activation_scale(torch.tensor([[-896.0, 3.0]])).item() == 2.0


def test_reference_quant_none_matches_experts_reference(gen):
    weights, ids = routing(6, 4, 2, gen)
    w_gate_up, w_down = expert_weights(4, 16, 24, gen)
    x = torch.randn(6, 16, generator=gen)
    got = F.experts_reference_quant(x, weights, ids, w_gate_up, w_down, scheme="none")
    assert torch.equal(got, experts_reference(x, weights, ids, w_gate_up, w_down))


def test_reference_quant_int4_dequantizes_before_the_reference(gen):
    weights, ids = routing(5, 3, 2, gen)
    w_gate_up, w_down = expert_weights(3, 32, 16, gen)
    p1, s1 = F.quantize_int4(w_gate_up, 16)
    p2, s2 = F.quantize_int4(w_down, 16)
    x = torch.randn(5, 32, generator=gen)
    got = F.experts_reference_quant(x, weights, ids, p1, p2, scheme="int4", w_gate_up_scale=s1,
                                    w_down_scale=s2, group_size=16)
    want = experts_reference(x, weights, ids, F.dequantize_int4(p1, s1, 16),
                             F.dequantize_int4(p2, s2, 16))
    assert torch.equal(got, want)


def test_reference_quant_requires_scales():
    x = torch.zeros(1, 4)
    with pytest.raises(UsageError, match="scales"):
        F.experts_reference_quant(x, torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32),
                                  torch.zeros(1, 4, 2, dtype=torch.uint8),
                                  torch.zeros(1, 4, 1, dtype=torch.uint8), scheme="int4")


def test_unknown_scheme_is_a_usage_error():
    with pytest.raises(UsageError, match=r"scheme 'int8'\n  expected: none \| fp8 \| int4\n"):
        F.QuantScheme.parse("int8")
    assert F.QuantScheme.parse("fp8") is F.QuantScheme.FP8
