"""ONNX schemas for the custom MoE ops, registered in-process.

The exporter needs them to emit the nodes; onnx's shape inference uses them. Other processes
(ONNX Runtime, Polygraphy, TensorRT's parser) do not: every artifact also carries the ops as
model-local functions, so no registration is needed to run it.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

from mixbuild.contract import DOMAIN, DOMAIN_VERSION, EXPERTS_OP, GATE_OP

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_WEIGHTS = _FLOATS + ["tensor(float8e4m3fn)", "tensor(uint8)", "tensor(int4)"]


# Optional inputs of quantized MoEExperts nodes, in order (absent when quantization = none).
QUANT_INPUTS = (
    ("w_gate_up_scale", "fp8: [E] or [E, 2I]; int4: [E, 2I, H/group]"),
    ("w_down_scale", "fp8: [E] or [E, H]; int4: [E, H, I/group]"),
    ("act_scale_gate_up", "fp8: static per-tensor scale of the expert input, [E] or []"),
    ("act_scale_down", "fp8: static per-tensor scale of the SwiGLU output, [E] or []"),
)


def _attr(name: str, default, doc: str) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), doc)


def _plugin_attrs() -> list[OpSchema.Attribute]:
    return [_attr("plugin_namespace", "mixbuild", "TensorRT plugin namespace"),
            _attr("plugin_version", "1", "TensorRT plugin version")]


def gate_schema() -> OpSchema:
    P = OpSchema.FormalParameter
    return OpSchema(
        GATE_OP, DOMAIN, DOMAIN_VERSION,
        doc="softmax (float32) -> top-k (ties to the lower id) -> optional renormalisation",
        inputs=[P("router_logits", "T", "[T, E]")],
        outputs=[P("weights", "tensor(float)", "[T, k]"), P("expert_ids", "tensor(int32)", "[T, k]")],
        type_constraints=[("T", _FLOATS, "activation type")],
        attributes=[OpSchema.Attribute("top_k", OpSchema.AttrType.INT, "experts per token"),
                    _attr("normalize", 1, "renormalise the k weights to sum to 1"),
                    *_plugin_attrs()])


def experts_schema() -> OpSchema:
    P = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    return OpSchema(
        EXPERTS_OP, DOMAIN, DOMAIN_VERSION,
        doc="sum over the k chosen experts of weight * w_down(silu(w1 x) * w3 x)",
        inputs=[P("hidden", "T", "[T, H]"), P("weights", "tensor(float)", "[T, k]"),
                P("expert_ids", "tensor(int32)", "[T, k]"), P("w_gate_up", "W", "[E, 2I, H]"),
                P("w_down", "W", "[E, H, I]"),
                *(P(name, "S", doc, param_option=optional) for name, doc in QUANT_INPUTS)],
        outputs=[P("out", "T", "[T, H]")],
        type_constraints=[("T", _FLOATS, "activation type"), ("W", _WEIGHTS, "weight type"),
                          ("S", _FLOATS, "scale type")],
        attributes=[_attr("activation", "silu", "expert activation (SwiGLU gate)"),
                    _attr("quantization", "none", "none | fp8 | int4"),
                    _attr("group_size", 0, "int4 group size along K (0 when unused)"),
                    *_plugin_attrs()])


def register() -> None:
    """Register both schemas once per process."""
    for schema in (gate_schema(), experts_schema()):
        try:
            onnx.defs.get_schema(schema.name, DOMAIN_VERSION, DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)
