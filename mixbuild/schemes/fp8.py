"""FP8: W8A8 E4M3, weight scales per output channel (or per tensor), static per-tensor
activation scales from calibration (docs/precision.md).

Graph form (mixbuild/quant/rewrite.py):
    linear:  MatMul(DQ(Q(x, s_x), s_x), DQ(W_fp8 [K, N], s_w [N]))
    experts: w_gate_up / w_down float8_e4m3fn [E, N, K], scales float32 [E, N] (or [E]), and
             per-expert activation scales act_scale_gate_up / act_scale_down [E]
Hugging Face: compressed-tensors "float-quantized" (weight, weight_scale [N, 1] | [1],
input_scale [1]) or NVIDIA's unified format (per-tensor scalars).
ONNX Runtime: no fp8 kernel with these numerics on the CPU provider; the session folds the
constant weight dequantization once at load (float32 GEMMs, 4x the fp8 bytes resident).
"""

from __future__ import annotations

import torch
from onnx import TensorProto

from mixbuild.contract import ExportFormat, Precision, QuantScheme
from mixbuild.errors import CheckpointError, UsageError
from mixbuild.plugins import formats
from mixbuild.schemes.base import QDQ_VERSIONS, Scheme, check_scale, positive
from mixbuild.schemes.ort import FOLD_DEQUANTIZE


class Fp8Columns:
    """GPTQ column quantizer for FP8 with scales fixed from the smoothed weight's amax."""

    def __init__(self, w: torch.Tensor, per_channel: bool) -> None:
        self.per_channel = per_channel
        amax = w.abs().amax(dim=-1) if per_channel else w.abs().amax().expand(w.shape[0])
        self.scale = torch.where(amax > 0, amax / formats.FP8_MAX, torch.ones_like(amax))

    def __call__(self, col: torch.Tensor, k: int, w: torch.Tensor) -> torch.Tensor:
        return formats.fp8_round(col / self.scale).float() * self.scale

    def encode(self, wq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = formats.fp8_round(wq / self.scale[:, None])
        return q, self.scale if self.per_channel else self.scale[:1].reshape(())


def codes(b, weight: str) -> str:
    """float(q) of a quantized tensor in a function body: a DequantizeLinear with scale 1. The
    scales are then multiplied in float32 (TensorRT-RTX rejects blocked FP8 and 3-D blocked
    INT4 DequantizeLinear), which is the same product the kernels compute."""
    return b("DequantizeLinear", weight, b.const(1.0, TensorProto.FLOAT))


class Fp8(Scheme):
    name = "fp8"
    precision = Precision.FP8
    moe = QuantScheme.FP8
    quantized = True
    quantizes_activations = True
    propagate = False
    routed_weight = 0.9
    hf_formats = (ExportFormat.HF, ExportFormat.HF_MODELOPT)
    expert_inputs = ("w_gate_up_scale", "w_down_scale", "act_scale_gate_up", "act_scale_down")
    linear_weight_type = torch.float8_e4m3fn
    expert_weight_type = torch.float8_e4m3fn

    trt_min_sm = (8, 9)
    trt_min_sm_why = "FP8 (E4M3) needs Ada (8.9), Hopper (9.0) or newer"
    trt_min_version = QDQ_VERSIONS
    trt_ops = "FP8 QuantizeLinear/DequantizeLinear"

    # ------------------------------------------------------------------------ quantizer
    def columns(self, w, config, order=None):
        return Fp8Columns(w, config.fp8_per_channel)

    def dequantize(self, q, scale, config):
        return formats.dequantize_fp8(q, scale)

    # ----------------------------------------------------------------------- ONNX graph
    def linear_layout(self, q, scale):
        return q.T.contiguous(), scale

    def linear_scale(self, n, k, config):
        return ([n] if config.fp8_per_channel else []), {"axis": 1}

    def expert_scale(self, e, n, k, config):
        return ([e, n] if config.fp8_per_channel else [e]), torch.float32

    def activation_scale(self, amax: float) -> float:
        return max(amax, 1e-8) / formats.FP8_MAX

    def onnx_dequantize(self, b, weight, scale, k, config):
        if not config.fp8_per_channel:  # scale [E]: per expert
            return b("DequantizeLinear", weight, scale, axis=0)
        return b("Mul", codes(b, weight), b("Unsqueeze", scale, b.const([2])))  # scale [E, N]

    def onnx_activation(self, b, x, which, expert):
        scale = b("Gather", f"act_scale_{which}", b.const(expert), axis=0)   # scalar
        q = b("QuantizeLinear", x, scale, output_dtype=TensorProto.FLOAT8E4M3FN)
        return b("DequantizeLinear", q, scale)

    # -------------------------------------------------------------- Hugging Face hand-off
    def check_hf(self, fmt, config):
        super().check_hf(fmt, config)
        if fmt is ExportFormat.HF_MODELOPT and config.fp8_per_channel:
            raise UsageError(
                "--format hf-modelopt needs per-tensor fp8 weight scales",
                expected="--fp8-weight-scales tensor (ModelOpt's quant_algo FP8 is per-tensor "
                         "weights with static input scales; its per-channel algorithm uses "
                         "dynamic per-token activation scales, not mixbuild's calibrated ones)",
                found="--fp8-weight-scales channel",
                hint="pass --fp8-weight-scales tensor, or use --format hf (compressed-tensors "
                     "holds per-channel weight scales with static input scales)")

    def compressed_tensors(self, config):
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                   "strategy": "channel" if config.fp8_per_channel else "tensor",
                   "dynamic": False, "observer": "minmax"}
        inputs = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                  "strategy": "tensor", "dynamic": False, "observer": "static_minmax"}
        return weights, inputs, "float-quantized"

    def hf_linear(self, prefix, q, scale, act_scale, fmt, config, dtype):
        check_scale(prefix + ".weight_scale", scale)
        n = q.shape[0]
        out = {prefix + ".weight": q.contiguous()}
        input_scale = torch.tensor(self.activation_scale(act_scale), dtype=torch.float32)
        check_scale(prefix + ".input_scale", input_scale)
        if fmt is ExportFormat.HF_MODELOPT:   # scalars: vLLM PerTensorScaleParameter
            out[prefix + ".weight_scale"] = scale.float().reshape(())
            out[prefix + ".input_scale"] = input_scale.reshape(())
        else:   # vLLM CompressedTensorsW8A8Fp8: ChannelQuantScaleParameter [N, 1] / [1]
            out[prefix + ".weight_scale"] = (scale.float().reshape(n, 1) if config.fp8_per_channel
                                             else scale.float().reshape(1))
            out[prefix + ".input_scale"] = input_scale.reshape(1)
        return out

    def hf_dequantize(self, read, prefix, shape, group, hint):
        n = shape[0]
        scale = positive(prefix + ".weight_scale", read(prefix + ".weight_scale"), hint)
        q = read(prefix + ".weight")
        if q.dtype != torch.float8_e4m3fn or tuple(q.shape) != shape:
            raise CheckpointError(f"{prefix}.weight has the wrong dtype or shape",
                                  expected=f"float8_e4m3fn {list(shape)}",
                                  found=f"{q.dtype} {list(q.shape)}", hint=hint)
        if scale.numel() not in (1, n):
            raise CheckpointError(f"{prefix}.weight_scale has the wrong shape",
                                  expected=f"[{n}, 1] or [1]", found=str(list(scale.shape)),
                                  hint=hint)
        w = q.float() * (scale.reshape(n, 1) if scale.numel() == n else scale.reshape(()))
        act = positive(prefix + ".input_scale", read(prefix + ".input_scale"), hint).reshape(())
        return w, act

    # -------------------------------------------------------------------- ONNX Runtime
    def ort_session(self, accuracy_level, fast):
        if not fast:
            return {}, {}
        folded = "float32 weights folded at load"
        return {FOLD_DEQUANTIZE: "1"}, {"experts": folded, "fp8_linears": folded}


FP8 = Fp8()
