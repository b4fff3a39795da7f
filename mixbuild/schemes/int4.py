"""INT4: W4A16, symmetric, group-wise along K (groups of `--group-size`, fp16 scales); and
INT8, the same grouped integer format at 8 bits, which only lm_head takes (`--lm-head int8`
of an int4 export). docs/precision.md.

Graph form (mixbuild/quant/rewrite.py):
    linear:  MatMul(x, DQ(W_int4 [K, N], s [K/G, N], axis=0, block_size=G))   (int8 alike)
    experts: ONNX INT4 [E, N, K] (bytes: packed two per byte, low nibble first, the layout the
             kernels read), scales float16 [E, N, K/G]
Hugging Face: compressed-tensors "pack-quantized" (weight_packed int32 [N, K/8], weight_scale
[N, K/G], weight_shape), int4 only.
ONNX Runtime: MoE experts -> com.microsoft.QMoE, int4 linears -> MatMulNBits (ONNX Runtime's
own fusion at the session's accuracy level), an int8 lm_head -> MatMulNBits(bits=8) on the CPU
(mixbuild/schemes/ort.py).
"""

from __future__ import annotations

import math

import torch
from onnx import TensorProto

from mixbuild.contract import ExportFormat, Precision, QuantScheme
from mixbuild.errors import CheckpointError, UsageError
from mixbuild.plugins import formats
from mixbuild.schemes.base import QDQ_VERSIONS, Scheme, check_scale, positive
from mixbuild.schemes.fp8 import codes
from mixbuild.schemes.ort import MATMULNBITS_LEVEL, rewrite_int4_experts, rewrite_int8_linears
from mixbuild.tensors import cast_finite

INT4_SCALE_DIVISOR = 7.5   # amax / 7.5, codes in [-8, 7]: compressed-tensors' symmetric int4


class IntColumns:
    """GPTQ column quantizer for grouped symmetric INT4 (or INT8, bits=8: lm_head). The group
    scales are static: computed from the (smoothed) weight before GPTQ starts, so that the
    columns can be visited in any order (`order`: the visiting position -> the column; GPTQ's
    act order, most active input channels first, as llm-compressor's "static" act order)."""

    def __init__(self, w: torch.Tensor, group: int, bits: int = 4,
                 order: torch.Tensor | None = None) -> None:
        self.group, self.bits, self.order = group, bits, order
        self.low, self.high = ((formats.INT4_MIN, formats.INT4_MAX) if bits == 4
                               else (-formats.INT8_MAX, formats.INT8_MAX))
        divisor = INT4_SCALE_DIVISOR if bits == 4 else formats.INT8_MAX
        amax = torch.stack([g.abs().amax(dim=-1) for g in w.split(group, dim=-1)], dim=-1)
        scale = torch.where(amax > 0, amax / divisor, torch.ones_like(amax))
        self.scales = scale.half().float()            # stored in fp16: round with it [N, groups]

    def __call__(self, col: torch.Tensor, k: int, w: torch.Tensor) -> torch.Tensor:
        column = int(self.order[k]) if self.order is not None else k
        scale = self.scales[:, column // self.group]
        return torch.round(col / scale).clamp(self.low, self.high) * scale

    def encode(self, wq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scale [N, groups] fp16) of wq (original column order): int4 packed two per
        byte [N, K/2], int8 [N, K]."""
        full = self.scales.repeat_interleave(self.group, dim=-1)[:, :wq.shape[1]]
        codes = torch.round(wq / full).clamp(self.low, self.high)
        packed = formats.pack_int4(codes) if self.bits == 4 else codes.to(torch.int8)
        return packed, self.scales.half()


def pack_int32(codes: torch.Tensor) -> torch.Tensor:
    """int codes in [-8, 7] [N, K] (K % 8 == 0) -> int32 [N, K / 8], compressed-tensors'
    pack_to_int32(num_bits=4): each code offset by 8 to an unsigned nibble, element 8w + j of a
    row in bits 4j..4j+3 of word w (first value in the lowest bits)."""
    n, k = codes.shape
    if k % 8:
        raise UsageError("compressed-tensors int4 packing needs K divisible by 8",
                         expected="K % 8 == 0", found=f"K = {k}")
    unsigned = (codes.to(torch.int64) + 8).view(n, k // 8, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (unsigned << shifts).sum(dim=-1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)   # two's complement int32
    return words.to(torch.int32)


def unpack_int32(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_int32: int32 [N, K / 8] -> int8 codes [N, K] in [-8, 7]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (packed.to(torch.int64)[..., None] >> shifts) & 0xF
    return (nibbles.flatten(-2)[..., :k] - 8).to(torch.int8)


def _reduction_sizes(spec) -> dict[str, int]:
    """Every K an int4 export groups: the hidden size (q/k/v projections, the experts'
    w_gate_up), the attention width Nq*D (o_proj) and the intermediate size (w_down)."""
    return {"hidden_size (attention q/k/v, expert w_gate_up)": spec.hidden_size,
            "num_heads * head_dim (attention o_proj)": spec.q_size,
            "intermediate_size (expert w_down)": spec.intermediate_size}


class Int4(Scheme):
    name = "int4"
    precision = Precision.INT4
    moe = QuantScheme.INT4
    quantized = True
    smoothing = True
    quantized_head = True
    grouped = True
    propagate = True
    routed_weight = 0.3
    hf_formats = (ExportFormat.HF,)
    expert_inputs = ("w_gate_up_scale", "w_down_scale")
    bits = 4
    linear_weight_type = "int4"
    expert_weight_type = "int4"

    trt_min_sm = (8, 0)
    trt_min_sm_why = "INT4 weights need Ampere (8.0) or newer"
    trt_min_version = QDQ_VERSIONS
    trt_ops = "INT4 blocked DequantizeLinear"

    # ------------------------------------------------------------------------ quantizer
    def columns(self, w, config, order=None):
        return IntColumns(w, config.group_size, self.bits, order)

    def dequantize(self, q, scale, config):
        return formats.dequantize_int4(q, scale, config.group_size)

    def check_spec(self, spec, config):
        """Refuse (UsageError) a group size that does not divide every reduction size K it
        groups. TensorRT's block quantization divides each blocked dimension by the block size,
        so a short last group would only fail later, at engine build."""
        sizes = _reduction_sizes(spec)
        bad = {name: k for name, k in sizes.items() if k % config.group_size}
        if not bad:
            return
        common = math.gcd(*sizes.values())
        valid = [g for g in range(2, common + 1, 2) if common % g == 0]
        ks = sorted(set(sizes.values()))
        raise UsageError(
            f"--group-size {config.group_size} does not divide the int4 reduction size(s) "
            + ", ".join(f"{name} = {k}" for name, k in bad.items()),
            expected=f"an even group size dividing {', '.join(map(str, ks))}",
            found=f"--group-size {config.group_size}",
            hint=(f"pass --group-size {' | '.join(map(str, valid))}" if valid else
                  f"no even group size divides {', '.join(map(str, ks))}: export --precision "
                  "fp8 instead"))

    # ----------------------------------------------------------------------- ONNX graph
    def linear_layout(self, q, scale):
        unpacked = formats.unpack_int4(q).T.contiguous()
        return formats.pack_int4(unpacked), scale.T.contiguous()

    def linear_scale(self, n, k, config):
        groups = -(-k // config.group_size)
        return [groups, n], {"axis": 0, "block_size": config.group_size}

    def expert_scale(self, e, n, k, config):
        return [e, n, -(-k // config.group_size)], torch.float16

    def onnx_dequantize(self, b, weight, scale, k, config):
        """INT4 [E, N, K] (packed two per byte, low nibble first) * scale [E, N, K/G], the
        group scales expanded along K: W[e, n, k] = q[e, n, k] * scale[e, n, k // G]."""
        groups = b.const([j // config.group_size for j in range(k)])                # k -> group
        full_scale = b("Gather", b("Cast", scale, to=TensorProto.FLOAT), groups, axis=2)
        return b("Mul", codes(b, weight), full_scale)

    # -------------------------------------------------------------- Hugging Face hand-off
    def check_hf_spec(self, spec):
        for what, k in (("hidden_size", spec.hidden_size), ("num_heads * head_dim", spec.q_size),
                        ("intermediate_size", spec.intermediate_size)):
            if k % 8:
                raise UsageError(f"compressed-tensors int4 packs 8 values per int32: {what} = {k} "
                                 "is not a multiple of 8", expected="K % 8 == 0",
                                 found=f"{what} = {k}", hint="export --format onnx instead")

    def compressed_tensors(self, config):
        weights = {"num_bits": 4, "type": "int", "symmetric": True,
                   "group_size": config.group_size, "strategy": "group", "dynamic": False,
                   "observer": "minmax"}
        return weights, None, "pack-quantized"

    def hf_linear(self, prefix, q, scale, act_scale, fmt, config, dtype):
        check_scale(prefix + ".weight_scale", scale)
        unpacked = formats.unpack_int4(q)
        n, k = unpacked.shape
        return {prefix + ".weight_packed": pack_int32(unpacked),
                prefix + ".weight_scale": cast_finite(scale, dtype, prefix + ".weight_scale"),
                prefix + ".weight_shape": torch.tensor([n, k], dtype=torch.int64)}

    def hf_group_size(self, quantization_config):
        return quantization_config["config_groups"]["group_0"]["weights"]["group_size"]

    def hf_dequantize(self, read, prefix, shape, group, hint):
        n, k = shape
        scale = positive(prefix + ".weight_scale", read(prefix + ".weight_scale"), hint)
        packed = read(prefix + ".weight_packed")
        stored = tuple(int(v) for v in read(prefix + ".weight_shape").tolist())
        groups = -(-k // group)
        if (packed.dtype != torch.int32 or tuple(packed.shape) != (n, k // 8) or stored != shape
                or tuple(scale.shape) != (n, groups)):
            raise CheckpointError(f"{prefix}: int4 tensors of the wrong dtype or shape",
                                  expected=f"weight_packed int32 [{n}, {k // 8}], weight_shape "
                                           f"{list(shape)}, weight_scale [{n}, {groups}]",
                                  found=f"weight_packed {packed.dtype} {list(packed.shape)}, "
                                        f"weight_shape {list(stored)}, weight_scale "
                                        f"{list(scale.shape)}", hint=hint)
        codes = unpack_int32(packed, k).float()
        return codes * scale.repeat_interleave(group, dim=-1)[:, :k], None

    # -------------------------------------------------------------------- ONNX Runtime
    def ort_session(self, accuracy_level, fast):
        return ({MATMULNBITS_LEVEL: str(int(accuracy_level))},
                {"int4_linears": f"MatMulNBits (accuracy_level {accuracy_level})"})

    def ort_rewrites(self, fast):
        return fast

    def ort_rewrite(self, model, directory, act_dtype, accuracy_level, head, on_cpu):
        done = rewrite_int4_experts(model, directory, act_dtype, accuracy_level)
        kernels = head.ort_head(model, directory, act_dtype, accuracy_level, on_cpu, done)
        if done.experts:
            kernels["experts"] = f"QMoE int4 x{done.experts} (accuracy_level {accuracy_level})"
        return done, kernels

    def ort_head(self, model, directory, act_dtype, accuracy_level, on_cpu, out):
        # ONNX Runtime fuses the blocked int4 DequantizeLinear + MatMul by itself
        return {"lm_head": f"MatMulNBits int4 (accuracy_level {accuracy_level})"}


class Int8(Int4):
    """The 8-bit grouped integer format of an int4 export's lm_head (`--lm-head int8`)."""

    name = "int8"
    precision = None
    moe = QuantScheme.NONE
    smoothing = False
    quantized_head = False
    hf_formats = ()
    bits = 8
    linear_weight_type = torch.int8
    expert_weight_type = None

    def linear_layout(self, q, scale):
        return q.T.contiguous(), scale.T.contiguous()

    # calibration dequantizes decoder layers only, never lm_head: not int4's unpacking
    dequantize = Scheme.dequantize

    def ort_head(self, model, directory, act_dtype, accuracy_level, on_cpu, out):
        if on_cpu:   # the CPU kernel's problem (mixbuild/schemes/ort.py)
            rewrite_int8_linears(model, directory, act_dtype, out=out)
        return ({"lm_head": "MatMulNBits int8 (accuracy_level 4: int8 activations)"}
                if out.linears else {})


INT4 = Int4()
INT8 = Int8()
