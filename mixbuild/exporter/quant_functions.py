"""MoEExperts function bodies for quantized experts: they dequantize exactly as the plugins do.

The weights are dequantized at the top of the body, then each expert's GEMMs run on its gathered
tokens like the plain body. ONNX Runtime does not constant-fold that dequantization (folding it
would undo the compression), so it runs on every call: this body defines the numerics, it is not
the fast path. What each format computes (the dequantization, and fp8's static activation
quantization, W8A8) is its scheme's `onnx_dequantize` / `onnx_activation`
(mixbuild/schemes); layouts are those of mixbuild.plugins.formats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx import TensorProto

from mixbuild.exporter.functions import FunctionBody, PlainWeights

if TYPE_CHECKING:  # pragma: no cover
    from mixbuild.quant.config import QuantConfig
    from mixbuild.schemes import Scheme


class QuantizedWeights(PlainWeights):
    """Quantized experts: the body dequantizes both weight tensors once, in float32, and runs
    each GEMM's input through the scheme's activation quantization."""

    def __init__(self, scheme: Scheme, config: QuantConfig, hidden: int, intermediate: int) -> None:
        self.scheme, self.config = scheme, config
        self.hidden, self.intermediate = hidden, intermediate
        self.extra_inputs = scheme.expert_inputs

    def prologue(self, b: FunctionBody) -> tuple[str, str, str]:
        x = b("Cast", "hidden", to=TensorProto.FLOAT)
        return (x, self.scheme.onnx_dequantize(b, "w_gate_up", "w_gate_up_scale", self.hidden,
                                               self.config),
                self.scheme.onnx_dequantize(b, "w_down", "w_down_scale", self.intermediate,
                                            self.config))

    def activation(self, b: FunctionBody, x: str, which: str, expert: int) -> str:
        return self.scheme.onnx_activation(b, x, which, expert)
