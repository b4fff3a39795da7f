"""MoEExperts function bodies for quantized experts: they dequantize exactly as the plugins do.

The weights are dequantized once at the top of the body (a constant subgraph that runtimes fold
at load), then each expert's GEMMs run on its gathered tokens like the plain body. FP8 also
quantizes each GEMM's input activation with its static scale (W8A8); INT4 is weight-only.
Layouts are those of mixbuild.plugins.formats; INT4 experts are ONNX INT4 tensors [E, N, K]
whose bytes are exactly the packed uint8 [E, N, K/2] layout the kernels read.
"""

from __future__ import annotations

from onnx import TensorProto

from mixbuild.exporter.functions import PlainWeights, _Body


class FP8Weights(PlainWeights):
    extra_inputs = ("w_gate_up_scale", "w_down_scale", "act_scale_gate_up", "act_scale_down")

    def __init__(self, per_channel: bool, hidden: int, intermediate: int) -> None:
        self.per_channel, self.hidden, self.intermediate = per_channel, hidden, intermediate

    def _dequantize(self, b: _Body, weight: str, scale: str, k: int) -> str:
        if not self.per_channel:  # scale [E]: per expert
            return b("DequantizeLinear", weight, scale, axis=0)
        # per output channel, scale [E, N]: dequantize with 1 and multiply, the same product
        # float(q) * scale; TensorRT-RTX's builder crashes on a blocked FP8 DequantizeLinear
        values = b("DequantizeLinear", weight, b.const(1.0, TensorProto.FLOAT))
        return b("Mul", values, b("Unsqueeze", scale, b.const([2])))

    def prologue(self, b: _Body) -> tuple[str, str, str]:
        x = b("Cast", "hidden", to=TensorProto.FLOAT)
        return (x, self._dequantize(b, "w_gate_up", "w_gate_up_scale", self.hidden),
                self._dequantize(b, "w_down", "w_down_scale", self.intermediate))

    def activation(self, b: _Body, x: str, which: str, expert: int) -> str:
        scale = b("Gather", f"act_scale_{which}", b.const(expert), axis=0)   # scalar
        q = b("QuantizeLinear", x, scale, output_dtype=TensorProto.FLOAT8E4M3FN)
        return b("DequantizeLinear", q, scale)


class Int4Weights(PlainWeights):
    extra_inputs = ("w_gate_up_scale", "w_down_scale")

    def __init__(self, group_size: int, hidden: int, intermediate: int) -> None:
        self.group_size, self.hidden, self.intermediate = group_size, hidden, intermediate

    def _dequantize(self, b: _Body, weight: str, scale: str, k: int) -> str:
        """INT4 [E, N, K] (packed two per byte, low nibble first) * scale [E, N, K/G]: a blocked
        DequantizeLinear along K, as TensorRT and ONNX Runtime implement it."""
        # float(q) * scale[k // G] in float32, as the kernels compute it: dequantize with 1, then
        # multiply by the group scales expanded along K (TensorRT-RTX imports no 3-D blocked
        # INT4 DequantizeLinear without a GPU)
        values = b("DequantizeLinear", weight, b.const(1.0, TensorProto.FLOAT))
        groups = b.const([j // self.group_size for j in range(k)])                  # k -> group
        full_scale = b("Gather", b("Cast", scale, to=TensorProto.FLOAT), groups, axis=2)
        return b("Mul", values, full_scale)

    def prologue(self, b: _Body) -> tuple[str, str, str]:
        x = b("Cast", "hidden", to=TensorProto.FLOAT)
        return (x, self._dequantize(b, "w_gate_up", "w_gate_up_scale", self.hidden),
                self._dequantize(b, "w_down", "w_down_scale", self.intermediate))


