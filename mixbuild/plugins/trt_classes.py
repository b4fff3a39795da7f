"""IPluginV3 classes for MoEGate and MoEExperts, defined against one TensorRT Python module.

Use trt_plugins.plugin_classes(trt) / trt_plugins.register_plugins(backend) rather than this module:
`define(trt)` builds the classes for `tensorrt` or `tensorrt_rtx` (their plugin APIs are the same).
Shape legend: T tokens, E experts, H hidden, I intermediate, k top-k.
"""

from __future__ import annotations

from mixbuild.contract import PLUGIN_NAMESPACE, PLUGIN_VERSION, QuantScheme
from mixbuild.errors import UsageError
from mixbuild.plugins.trt_fields import (
    EXPERTS_PLUGIN,
    GATE_PLUGIN,
    QUANT_INPUTS,
    ExpertsAttrs,
    GateAttrs,
    attrs_from_fields,
    attrs_to_items,
    device_tensor,
    field_value,
    make_fields,
    torch_dtype,
    workspace_tensor,
)


def define(trt) -> dict[str, type]:
    base = _base_class(trt)
    gate = _gate_class(trt, base)
    experts = _experts_class(trt, base)
    return {
        "GatePlugin": gate,
        "ExpertsPlugin": experts,
        "GateCreator": _creator_class(trt, GATE_PLUGIN, GateAttrs, gate,
                                      [("top_k", 2), ("normalize", 1)]),
        "ExpertsCreator": _creator_class(trt, EXPERTS_PLUGIN, ExpertsAttrs, experts,
                                         [("activation", "silu"), ("quantization", "none"),
                                          ("group_size", 0)]),
    }


def _base_class(trt):
    class MoEPluginBase(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
                        trt.IPluginV3OneRuntime):
        """What both plugins share: identity, cloning, field serialisation, no tactics."""

        NAME = ""
        NUM_OUTPUTS = 1

        def __init__(self, attrs, phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.attrs = attrs
            self.phase = phase
            self.plugin_name = self.NAME
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.num_outputs = self.NUM_OUTPUTS
            self.timing_cache_id = ""
            self._field_arrays = []

        def get_capability_interface(self, type):
            return self

        def clone(self):
            return type(self)(self.attrs, self.phase)

        def get_fields_to_serialize(self):
            collection, self._field_arrays = make_fields(trt, attrs_to_items(self.attrs))
            return collection

        def configure_plugin(self, inp, out):
            pass

        def on_shape_change(self, inp, out):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def get_workspace_size(self, inp, out):
            return 0

        def destroy(self):
            pass

        def workspace_bytes(self, inputs) -> int:
            return 0

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            """Wrap TensorRT's pointers as torch tensors and run compute() on TensorRT's stream."""
            import torch

            ins = [device_tensor(trt, ptr, desc) for ptr, desc in zip(inputs, input_desc)]
            outs = [device_tensor(trt, ptr, desc) for ptr, desc in zip(outputs, output_desc)]
            scratch = workspace_tensor(workspace, self.workspace_bytes(ins))
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                self.compute(ins, outs, scratch)

        def compute(self, inputs, outputs, workspace=None):
            raise NotImplementedError

    return MoEPluginBase


_FLOAT_NAMES = ("FLOAT", "HALF", "BF16")


def _types(trt, *names):
    return tuple(getattr(trt.DataType, name) for name in names)


def _gate_class(trt, base):
    floats = _types(trt, *_FLOAT_NAMES)
    allowed = (floats, _types(trt, "FLOAT"), _types(trt, "INT32"))

    class MoEGatePlugin(base):
        """router_logits [T, E] -> (weights [T, k] float, expert_ids [T, k] int32)."""

        NAME = GATE_PLUGIN
        NUM_OUTPUTS = 2

        def get_output_data_types(self, input_types):
            return [trt.DataType.FLOAT, trt.DataType.INT32]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            rows, k = inputs[0][0], expr_builder.constant(self.attrs.top_k)
            return [trt.DimsExprs([rows, k]), trt.DimsExprs([rows, k])]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            return (num_inputs == 1 and pos < len(allowed)
                    and desc.format == trt.TensorFormat.LINEAR and desc.type in allowed[pos])

        def configure_plugin(self, inp, out):
            experts = inp[0].desc.dims[1]
            if 0 <= experts < self.attrs.top_k:
                raise UsageError("MoEGate top_k exceeds the number of experts",
                                 expected=f"top_k <= E = {experts}", found=str(self.attrs.top_k))

        def compute(self, inputs, outputs, workspace=None):
            """The work of enqueue on torch tensors: [router_logits] -> [weights, expert_ids]."""
            from mixbuild.plugins.dispatch import moe_gate_triton

            moe_gate_triton(inputs[0], self.attrs.top_k, self.attrs.normalize,
                            out=(outputs[0], outputs[1]))

    return MoEGatePlugin


def _experts_class(trt, base):
    floats = _types(trt, *_FLOAT_NAMES)
    weight_types = {QuantScheme.FP8: _types(trt, "FP8", "UINT8"),
                    QuantScheme.INT4: _types(trt, "UINT8", "INT4")}
    scale_types = {QuantScheme.FP8: _types(trt, "FLOAT"),
                   QuantScheme.INT4: _types(trt, "FLOAT", "HALF")}

    class MoEExpertsPlugin(base):
        """(hidden [T, H], weights, expert_ids [T, k], w_gate_up, w_down, scales...) -> [T, H]."""

        NAME = EXPERTS_PLUGIN

        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[0])]

        def allowed_types(self, pos, hidden_type, num_inputs):
            scheme = self.attrs.quantization
            if pos == 0:
                return floats
            if pos == num_inputs:
                return (hidden_type,)
            if pos in (1, 2):
                return _types(trt, "FLOAT" if pos == 1 else "INT32")
            if pos in (3, 4):
                return (hidden_type,) if scheme == QuantScheme.NONE else weight_types[scheme]
            return scale_types[scheme] if pos < num_inputs else ()

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if num_inputs != self.attrs.num_inputs or desc.format != trt.TensorFormat.LINEAR:
                return False
            hidden_type = desc.type if pos == 0 else in_out[0].desc.type
            return desc.type in self.allowed_types(pos, hidden_type, num_inputs)

        def configure_plugin(self, inp, out):
            if len(inp) != self.attrs.num_inputs:
                names = ", ".join(("hidden", "weights", "expert_ids", "w_gate_up", "w_down",
                                   *QUANT_INPUTS[self.attrs.quantization]))
                raise UsageError(f"MoEExperts ({self.attrs.quantization.value}) has the wrong "
                                 "number of inputs", expected=f"{self.attrs.num_inputs}: {names}",
                                 found=str(len(inp)))

        def get_workspace_size(self, inp, out):
            from mixbuild.plugins.dispatch import experts_workspace_bytes

            hidden, ids, w_gate_up = inp[0].max, inp[2].max, inp[3].max
            return experts_workspace_bytes(
                hidden[0], ids[1], w_gate_up[0], hidden[1], w_gate_up[1] // 2,
                torch_dtype(trt, inp[0].desc.type), self.attrs.quantization)

        def workspace_bytes(self, inputs) -> int:
            """Workspace needed for these input tensors (torch views of TensorRT's tensors)."""
            from mixbuild.plugins.dispatch import experts_workspace_bytes

            hidden, ids, w_gate_up = inputs[0], inputs[2], inputs[3]
            return experts_workspace_bytes(hidden.shape[0], ids.shape[1], w_gate_up.shape[0],
                                           hidden.shape[1], w_gate_up.shape[1] // 2,
                                           hidden.dtype, self.attrs.quantization)

        def compute(self, inputs, outputs, workspace=None):
            """The work of enqueue on torch tensors: the node's inputs -> [out]."""
            from mixbuild.plugins.dispatch import moe_experts_triton

            hidden, weights, ids, w_gate_up, w_down, *scales = inputs
            scheme = self.attrs.quantization
            moe_experts_triton(hidden, weights, ids, w_gate_up, w_down, scheme=scheme,
                               group_size=self.attrs.group_size or 128, out=outputs[0],
                               workspace=workspace, **dict(zip(QUANT_INPUTS[scheme], scales)))

    return MoEExpertsPlugin


def _creator_class(trt, plugin_name, attrs_cls, plugin_cls, defaults):
    class MoEPluginCreator(trt.IPluginCreatorV3One):
        """Creates the plugin from ONNX node attributes or from serialised fields."""

        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = plugin_name
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            collection, self._field_arrays = make_fields(trt, defaults)
            self.field_names = collection

        def create_plugin(self, name, field_collection, phase):
            items = [(f.name, field_value(trt, f)) for f in field_collection]
            return plugin_cls(attrs_from_fields(attrs_cls, items), phase)

    MoEPluginCreator.__name__ = MoEPluginCreator.__qualname__ = f"{plugin_name}Creator"
    return MoEPluginCreator
