"""Quantized expert-weight layouts shared by the quantizer, the ONNX artifacts and the kernels.

Shape legend: T tokens, E experts, H hidden, I intermediate, k top-k. Every expert GEMM is
``y = x @ W[e].T`` with ``W[e]`` of shape [N, K] (N output channels, K reduction):

    w_gate_up  [E, 2I, H]   N = 2I, K = H   rows 0..I-1 are w1 (gate), rows I..2I-1 are w3 (up)
    w_down     [E, H, I]    N = H,  K = I

Scheme "none"
    Weights in the activation dtype (float32, float16 or bfloat16); no scales.

Scheme "fp8" (W8A8, OCP FP8 E4M3 "fn": finite, max 448, no infinities)
    w_gate_up        float8_e4m3fn [E, 2I, H]  (uint8 holding the same bit patterns is accepted)
    w_down           float8_e4m3fn [E, H, I]
    w_gate_up_scale  float32 [E]       one scale per expert (per tensor), or
                     float32 [E, 2I]   one scale per output channel
    w_down_scale     float32 [E] or [E, H], likewise
    act_scale_gate_up  float32 [] / [1] (one static scale) or [E] (one per expert): the scale of
                     the expert input x (the hidden states)
    act_scale_down   float32 [] / [1] or [E]: the scale of the SwiGLU output silu(gate) * up

    Real weight:      W[e, n, k] = float(q[e, n, k]) * scale[e]        (per tensor)
                      W[e, n, k] = float(q[e, n, k]) * scale[e, n]     (per channel)
    Weight quantizer: scale = amax / 448 over the expert (or the row); an all-zero tensor or
                      row gets scale 1. q = e4m3(W / scale), round to nearest even.
    Activations:      xq = e4m3(clamp(x / s, -448, 448)) (round to nearest even), computed in
                      float32; the GEMM multiplies its float32 accumulator by s * w_scale.
    Note: a checkpoint with separate w1 / w3 per-tensor scales maps losslessly onto the
    per-channel form [E, 2I] (repeat each scale over its I rows).

Scheme "int4" (W4A16, symmetric, grouped along K)
    w_gate_up        uint8 [E, 2I, H // 2]   packed (see below)
    w_down           uint8 [E, H, I // 2]
    w_gate_up_scale  float16 or float32 [E, 2I, ceil(H / G)]
    w_down_scale     float16 or float32 [E, H, ceil(I / G)]
    group_size G     128 by default; K must be even (G need not divide K: the last group is short)

    Packing: byte j of row n holds k = 2j in its low nibble (bits 0-3) and k = 2j + 1 in its high
    nibble (bits 4-7). Each nibble is a 4-bit two's complement integer q in [-8, 7].
    These bytes are exactly the raw data of an ONNX INT4 tensor of shape [E, N, K] (ONNX packs
    the first element into the low nibble), and the scale shape is that of an ONNX blocked
    DequantizeLinear with axis=-1, block_size=G.
    Real weight:      W[e, n, k] = q[e, n, k] * scale[e, n, k // G]
    Quantizer:        scale = amax(|W| over the group) / 7 (all-zero group: scale 1),
                      q = clamp(round_half_even(W / scale), -8, 7). Activations stay in the
                      activation dtype; the kernel dequantizes weight tiles to it.

Everything here is plain torch and is the reference for the Triton kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mixbuild.contract import QuantScheme
from mixbuild.errors import UsageError

FP8_MAX = 448.0
INT4_MIN, INT4_MAX = -8, 7
INT8_MAX = 127          # symmetric int8 (lm_head): codes in [-127, 127]
DEFAULT_GROUP_SIZE = 128


# ----------------------------------------------------------------------------------------- FP8

def fp8_round(x: Tensor) -> Tensor:
    """float32 -> float8_e4m3fn with saturation to +-448 and round-to-nearest-even."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_fp8(w: Tensor, *, per_channel: bool = False) -> tuple[Tensor, Tensor]:
    """W [E, N, K] -> (q float8_e4m3fn [E, N, K], scale float32 [E] or [E, N] when per_channel)."""
    _check_rank(w, 3, "expert weight [E, N, K]")
    w = w.float()
    amax = w.abs().amax(dim=-1) if per_channel else w.abs().flatten(1).amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    expand = scale[:, :, None] if per_channel else scale[:, None, None]
    return fp8_round(w / expand), scale


def dequantize_fp8(q: Tensor, scale: Tensor) -> Tensor:
    """(q [E, N, K] e4m3 or its uint8 bits, scale [E] or [E, N]) -> float32 [E, N, K]."""
    values = _as_e4m3(q).float()
    scale = scale.float()
    if scale.dim() == 1:
        return values * scale[:, None, None]
    return values * scale[:, :, None]


def fp8_activation_scale(x: Tensor) -> Tensor:
    """A static per-tensor activation scale from calibration data: amax / 448 (1 if all zero)."""
    amax = x.detach().float().abs().amax()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).reshape(1)


def fake_quantize_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """Quantize activations to e4m3 with `scale` and back: float32, same shape as x."""
    scale = scale.float()
    return fp8_round(x.float() / scale).float() * scale


def _as_e4m3(q: Tensor) -> Tensor:
    return q.view(torch.float8_e4m3fn) if q.dtype == torch.uint8 else q


# ---------------------------------------------------------------------------------------- INT4

def pack_int4(q: Tensor) -> Tensor:
    """int values in [-8, 7] [..., K] (K even) -> uint8 [..., K // 2], low nibble = even k."""
    if q.shape[-1] % 2:
        raise UsageError("int4 packing needs an even K", expected="K % 2 == 0",
                         found=f"K = {q.shape[-1]}")
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [..., K // 2] -> int8 [..., K] in [-8, 7] (inverse of pack_int4)."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    q = torch.stack((low, high), dim=-1).flatten(-2)
    return torch.where(q >= 8, q - 16, q)


def quantize_int4(w: Tensor, group_size: int = DEFAULT_GROUP_SIZE,
                  scale_dtype: torch.dtype = torch.float16) -> tuple[Tensor, Tensor]:
    """W [E, N, K] -> (packed uint8 [E, N, K // 2], scale [E, N, ceil(K / G)] in scale_dtype)."""
    _check_rank(w, 3, "expert weight [E, N, K]")
    check_group_size(group_size, w.shape[-1])
    w = w.float()
    amax = torch.stack([g.abs().amax(dim=-1) for g in w.split(group_size, dim=-1)], dim=-1)
    scale = torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax)).to(scale_dtype)
    full = _expand_groups(scale.float(), group_size, w.shape[-1])
    q = torch.round(w / full).clamp(INT4_MIN, INT4_MAX)
    return pack_int4(q), scale


def dequantize_int4(packed: Tensor, scale: Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> Tensor:
    """(packed uint8 [E, N, K // 2], scale [E, N, ceil(K / G)]) -> float32 [E, N, K]."""
    q = unpack_int4(packed).float()
    check_group_size(group_size, q.shape[-1])
    expected = math.ceil(q.shape[-1] / group_size)
    if scale.shape[-1] != expected:
        raise UsageError("int4 scale has the wrong number of groups",
                         expected=f"{expected} groups (K={q.shape[-1]}, group_size={group_size})",
                         found=f"scale shape {tuple(scale.shape)}")
    return q * _expand_groups(scale.float(), group_size, q.shape[-1])


def check_group_size(group_size: int, k: int) -> None:
    """A positive group size and an even K (the packing pairs neighbouring k)."""
    if group_size <= 0:
        raise UsageError("int4 group size must be positive", expected="> 0",
                         found=str(group_size))
    if k % 2:
        raise UsageError("int4 weights need an even reduction size K", expected="K % 2 == 0",
                         found=f"K = {k}")


def _expand_groups(scale: Tensor, group_size: int, k: int) -> Tensor:
    return scale.repeat_interleave(group_size, dim=-1)[..., :k]


# ----------------------------------------------------------------------------------- reference

def dequantize_experts(w_gate_up: Tensor, w_down: Tensor, scheme: QuantScheme | str, *,
                       w_gate_up_scale: Tensor | None = None, w_down_scale: Tensor | None = None,
                       group_size: int = DEFAULT_GROUP_SIZE) -> tuple[Tensor, Tensor]:
    """Real-valued float32 (w_gate_up [E, 2I, H], w_down [E, H, I]) of any scheme."""
    scheme = QuantScheme.parse(scheme)
    if scheme is QuantScheme.NONE:
        return w_gate_up.float(), w_down.float()
    if w_gate_up_scale is None or w_down_scale is None:
        raise UsageError(f"{scheme.value} experts need weight scales",
                         expected="w_gate_up_scale and w_down_scale", found="None")
    if scheme is QuantScheme.FP8:
        return dequantize_fp8(w_gate_up, w_gate_up_scale), dequantize_fp8(w_down, w_down_scale)
    return (dequantize_int4(w_gate_up, w_gate_up_scale, group_size),
            dequantize_int4(w_down, w_down_scale, group_size))


def experts_reference_quant(hidden: Tensor, weights: Tensor, expert_ids: Tensor, w_gate_up: Tensor,
                            w_down: Tensor, *, scheme: QuantScheme | str = "none",
                            w_gate_up_scale: Tensor | None = None,
                            w_down_scale: Tensor | None = None,
                            act_scale_gate_up: Tensor | None = None,
                            group_size: int = DEFAULT_GROUP_SIZE) -> Tensor:
    """Dequantize the experts, then run ops.experts_reference in float32; out [T, H] hidden dtype.

    For fp8 the expert input is fake-quantized with `act_scale_gate_up` first (a per-tensor
    scale; a per-expert [E] scale is not expressible here, pass one element). The quantization
    of the SwiGLU output (act_scale_down) is not modelled: kernels that apply it differ from this
    reference by that rounding (relative error up to 2^-4 per element, averaging out over I).
    """
    from mixbuild.model.ops import experts_reference

    scheme = QuantScheme.parse(scheme)
    w1, w2 = dequantize_experts(w_gate_up, w_down, scheme, w_gate_up_scale=w_gate_up_scale,
                                w_down_scale=w_down_scale, group_size=group_size)
    x = hidden.float()
    if scheme is QuantScheme.FP8:
        if act_scale_gate_up is None or act_scale_gate_up.numel() != 1:
            raise UsageError("the fp8 reference needs one static activation scale",
                             expected="act_scale_gate_up with one element",
                             found="None" if act_scale_gate_up is None
                             else f"shape {tuple(act_scale_gate_up.shape)}")
        x = fake_quantize_fp8(x, act_scale_gate_up.reshape(()))
    return experts_reference(x, weights, expert_ids, w1, w2).to(hidden.dtype)


def _check_rank(t: Tensor, rank: int, what: str) -> None:
    if t.dim() != rank:
        raise UsageError(f"{what} has the wrong rank", expected=f"{rank} dimensions",
                         found=f"shape {tuple(t.shape)}")
