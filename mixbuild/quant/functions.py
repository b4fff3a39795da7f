"""MoEExperts function bodies for quantized experts: they dequantize exactly as the plugins do.

The weights are dequantized once at the top of the body (a constant subgraph that runtimes fold
at load), then each expert's GEMMs run on its gathered tokens like the plain body. FP8 also
quantizes each GEMM's input activation with its static scale (W8A8); INT4 is weight-only.
Layouts are those of mixbuild.plugins.formats.
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
        blocked = b("Unsqueeze", scale, b.const([2]))  # [E, N, 1]: one block spans all of K
        return b("DequantizeLinear", weight, blocked, axis=2, block_size=k)

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

    def _dequantize(self, b: _Body, packed: str, scale: str, k: int) -> str:
        """uint8 [E, N, K/2] (low nibble = even k, two's complement) * scale [E, N, K/G]."""
        low = b("Cast", b("BitwiseAnd", packed, b.const(15, TensorProto.UINT8)), to=TensorProto.INT32)
        high = b("Cast", b("BitShift", packed, b.const(4, TensorProto.UINT8), direction="RIGHT"),
                 to=TensorProto.INT32)
        last = b.const([-1])
        pairs = b("Concat", b("Unsqueeze", low, last), b("Unsqueeze", high, last), axis=-1)
        nibbles = b("Reshape", pairs, b.const([0, 0, k]))                         # [E, N, K]
        signed = b("Where", b("GreaterOrEqual", nibbles, b.const(8, TensorProto.INT32)),
                   b("Sub", nibbles, b.const(16, TensorProto.INT32)), nibbles)
        groups = b.const([j // self.group_size for j in range(k)])                  # k -> group
        full_scale = b("Gather", b("Cast", scale, to=TensorProto.FLOAT), groups, axis=2)
        return b("Mul", b("Cast", signed, to=TensorProto.FLOAT), full_scale)

    def prologue(self, b: _Body) -> tuple[str, str, str]:
        x = b("Cast", "hidden", to=TensorProto.FLOAT)
        return (x, self._dequantize(b, "w_gate_up", "w_gate_up_scale", self.hidden),
                self._dequantize(b, "w_down", "w_down_scale", self.intermediate))


