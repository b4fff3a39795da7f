"""The names, domain and attributes of mixbuild's ONNX contract (see DESIGN.md)."""

from __future__ import annotations

DOMAIN = "mixbuild"
DOMAIN_VERSION = 1
OPSET = 21                      # blocked DequantizeLinear (int4) needs 21
PLUGIN_NAMESPACE = "mixbuild"   # TensorRT plugin namespace the MoE nodes name
PLUGIN_VERSION = "1"

GATE_OP = "MoEGate"
EXPERTS_OP = "MoEExperts"
MOE_OPS = (GATE_OP, EXPERTS_OP)

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "mixbuild.json"
