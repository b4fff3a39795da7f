"""MoEExperts function bodies for quantized experts: they dequantize exactly as the plugins do.

The weights are dequantized at the top of the body, then each expert's GEMMs run on its gathered
tokens like the plain body. ONNX Runtime does not constant-fold that dequantization (folding it
would undo the compression), so it runs on every call: this body defines the numerics, it is not
the fast path. FP8 also
quantizes each GEMM's input activation with its static scale (W8A8); INT4 is weight-only.
Layouts are those of mixbuild.plugins.formats; INT4 experts are ONNX INT4 tensors [E, N, K]
whose bytes are exactly the packed uint8 [E, N, K/2] layout the kernels read.
"""

from __future__ import annotations

from onnx import TensorProto

from mixbuild.exporter.functions import FunctionBody, PlainWeights


class _ScaledWeights(PlainWeights):
    """Quantized experts: the body dequantizes both weight tensors once, in float32."""

    hidden: int
    intermediate: int

    def _dequantize(self, b: FunctionBody, weight: str, scale: str, k: int) -> str:
        raise NotImplementedError

    def prologue(self, b: FunctionBody) -> tuple[str, str, str]:
        x = b("Cast", "hidden", to=TensorProto.FLOAT)
        return (x, self._dequantize(b, "w_gate_up", "w_gate_up_scale", self.hidden),
                self._dequantize(b, "w_down", "w_down_scale", self.intermediate))


def _codes(b: FunctionBody, weight: str) -> str:
    """float(q) of a quantized tensor: a DequantizeLinear with scale 1. The scales are then
    multiplied in float32 (TensorRT-RTX rejects blocked FP8 and 3-D blocked INT4
    DequantizeLinear), which is the same product the kernels compute."""
    return b("DequantizeLinear", weight, b.const(1.0, TensorProto.FLOAT))


class FP8Weights(_ScaledWeights):
    extra_inputs = ("w_gate_up_scale", "w_down_scale", "act_scale_gate_up", "act_scale_down")

    def __init__(self, per_channel: bool, hidden: int, intermediate: int) -> None:
        self.per_channel, self.hidden, self.intermediate = per_channel, hidden, intermediate

    def _dequantize(self, b: FunctionBody, weight: str, scale: str, k: int) -> str:
        if not self.per_channel:  # scale [E]: per expert
            return b("DequantizeLinear", weight, scale, axis=0)
        return b("Mul", _codes(b, weight), b("Unsqueeze", scale, b.const([2])))  # scale [E, N]

    def activation(self, b: FunctionBody, x: str, which: str, expert: int) -> str:
        scale = b("Gather", f"act_scale_{which}", b.const(expert), axis=0)   # scalar
        q = b("QuantizeLinear", x, scale, output_dtype=TensorProto.FLOAT8E4M3FN)
        return b("DequantizeLinear", q, scale)


class Int4Weights(_ScaledWeights):
    extra_inputs = ("w_gate_up_scale", "w_down_scale")

    def __init__(self, group_size: int, hidden: int, intermediate: int) -> None:
        self.group_size, self.hidden, self.intermediate = group_size, hidden, intermediate

    def _dequantize(self, b: FunctionBody, weight: str, scale: str, k: int) -> str:
        """INT4 [E, N, K] (packed two per byte, low nibble first) * scale [E, N, K/G], the
        group scales expanded along K: W[e, n, k] = q[e, n, k] * scale[e, n, k // G]."""
        groups = b.const([j // self.group_size for j in range(k)])                  # k -> group
        full_scale = b("Gather", b("Cast", scale, to=TensorProto.FLOAT), groups, axis=2)
        return b("Mul", _codes(b, weight), full_scale)
