"""The graph TensorRT's ONNX parser sees, prepared for one MoE mode (weights untouched).

How the parser maps a `mixbuild::MoEGate` / `MoEExperts` node (onnx-tensorrt ModelImporter,
parseNode): when the node has a `plugin_namespace` attribute and a creator (op type,
plugin_version, plugin_namespace) is registered, the node becomes an IPluginV3 layer; otherwise
a model-local function of that name is imported inline; otherwise the fallback plugin importer
runs. Older parsers (onnx-tensorrt 10.1) try local functions *before* plugins. So:

    plugin  the MoE FunctionProtos are dropped (every parser version then reaches the plugin
            importer), missing plugin attributes are added, and packed INT4 expert weights
            (UINT8 [E, N, K/2], which the parser would widen to INT32 for a non-Q/DQ consumer)
            are retyped INT4 [E, N, K]: the same bytes, low nibble first, as the plugin reads.
    inline  the plugin attributes are stripped, so no registered creator can claim the node and
            the parser imports the function bodies.

Only the graph proto is loaded and rewritten (load_external_data=False); the initializers keep
pointing at model.onnx.data, which the parser reads from beside the artifact's model.onnx.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mixbuild.builder.options import MoEMode
from mixbuild.contract import (
    DOMAIN,
    EXPERTS_OP,
    MOE_OPS,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    QuantScheme,
)
from mixbuild.errors import ArtifactError

PLUGIN_ATTRS = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}
INT4_WEIGHT_SLOTS = (3, 4)        # MoEExperts inputs w_gate_up, w_down


@dataclass
class PreparedGraph:
    model: object                                   # onnx.ModelProto, graph only
    mode: MoEMode
    rewrites: list[str] = field(default_factory=list)
    moe_nodes: dict[str, int] = field(default_factory=dict)

    def serialize(self) -> bytes:
        return self.model.SerializeToString()


def load_graph(onnx_path: Path):
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False)


def moe_nodes(model) -> list:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in MOE_OPS]


def prepare(model, mode: MoEMode, capacity: int | None = None) -> PreparedGraph:
    """Rewrite `model` (an onnx.ModelProto, modified in place) for `mode`; `capacity` fixes the
    serving layout's cache capacity dim (TensorRT's KV-cache update layer needs it static)."""
    nodes = moe_nodes(model)
    if not nodes:
        raise ArtifactError("the artifact has no mixbuild MoE nodes",
                            expected=f"{DOMAIN}::{' / '.join(MOE_OPS)} nodes",
                            hint="export it with `mixbuild export`")
    graph = PreparedGraph(model, mode, moe_nodes=dict(Counter(n.op_type for n in nodes)))
    if mode is MoEMode.PLUGIN:
        graph.rewrites += _set_plugin_attrs(nodes)
        graph.rewrites += _retype_int4_weights(model, nodes)
        graph.rewrites += _drop_moe_functions(model)
    else:
        _require_functions(model)
        graph.rewrites += _strip_plugin_attrs(nodes)
        graph.rewrites += _inline_moe_functions(model)
    if capacity is not None:
        graph.rewrites += _fix_capacity(model, capacity)
    return graph


def _fix_capacity(model, capacity: int) -> list[str]:
    """The serving cache's `capacity` dim -> a fixed size on every graph input and output."""
    fixed = 0
    for value in (*model.graph.input, *model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "capacity":
                dim.dim_value = capacity     # clears dim_param (a oneof)
                fixed += 1
    return [f"cache capacity fixed at {capacity} on {fixed} inputs and outputs"] if fixed else []


def _inline_moe_functions(model) -> list[str]:
    """Expand the MoE function bodies at each call site, with names made unique per call.

    TensorRT's parser inlines local functions itself but keeps the body's node names, so a body
    used by every layer produces duplicate layer names, which its DequantizeLinear importer
    rejects. The weights stay external: inlining touches only the graph's nodes."""
    import onnx.inliner

    inlined = onnx.inliner.inline_selected_functions(
        model, [(DOMAIN, op) for op in MOE_OPS], exclude=False)
    count = len(moe_nodes(model))
    del model.graph.node[:]
    model.graph.node.extend(inlined.graph.node)
    _drop_moe_functions(model)
    return [f"inlined the MoE function bodies at {count} call sites"]


def _attr(node, name: str):
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return None


def _set_plugin_attrs(nodes) -> list[str]:
    import onnx

    changed = set()
    for node in nodes:
        for name, wanted in PLUGIN_ATTRS.items():
            value = _attr(node, name)
            if value is None:
                node.attribute.append(onnx.helper.make_attribute(name, wanted))
                changed.add(id(node))
            elif value != wanted:
                raise ArtifactError(f"MoE node '{node.name}' asks for a TensorRT plugin this "
                                    f"mixbuild does not provide ({name} = {value!r})",
                                    expected=f"{name} = {wanted!r}",
                                    hint="export the artifact again with this mixbuild version, "
                                         "or build with --moe inline")
    return [f"added plugin attributes to {len(changed)} MoE nodes"] if changed else []


def _strip_plugin_attrs(nodes) -> list[str]:
    stripped = 0
    for node in nodes:
        keep = [a for a in node.attribute if a.name not in PLUGIN_ATTRS]
        stripped += len(node.attribute) - len(keep)
        del node.attribute[:]
        node.attribute.extend(keep)
    return [f"stripped plugin attributes from {len(nodes)} MoE nodes"] if stripped else []


def _drop_moe_functions(model) -> list[str]:
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name in MOE_OPS)]
    dropped = len(model.functions) - len(keep)
    del model.functions[:]
    model.functions.extend(keep)
    return [f"dropped {dropped} MoE function bodies (plugins replace them)"] if dropped else []


def _require_functions(model) -> None:
    present = {f.name for f in model.functions if f.domain == DOMAIN}
    missing = sorted({n.op_type for n in moe_nodes(model)} - present)
    if missing:
        raise ArtifactError(f"the artifact has no ONNX function body for {', '.join(missing)}",
                            expected="model-local functions for every MoE op (inline mode imports them)",
                            hint="export the artifact again, or build with --moe plugin")


def _retype_int4_weights(model, nodes) -> list[str]:
    """UINT8 [..., K/2] packed int4 expert weights -> INT4 [..., K] (no bytes change)."""
    from onnx import TensorProto

    initializers = {t.name: t for t in model.graph.initializer}
    consumers = Counter(name for n in model.graph.node for name in n.input)
    retyped = []
    for node in nodes:
        if node.op_type != EXPERTS_OP or \
                QuantScheme.parse(_attr(node, "quantization") or "none") is not QuantScheme.INT4:
            continue
        for slot in INT4_WEIGHT_SLOTS:
            tensor = initializers.get(node.input[slot])
            if tensor is None or tensor.data_type != TensorProto.UINT8 or tensor.name in retyped:
                continue
            if consumers[tensor.name] != 1:
                raise ArtifactError(f"packed int4 weight '{tensor.name}' feeds more than the MoE "
                                    "node", expected="one MoEExperts consumer",
                                    found=f"{consumers[tensor.name]} consumers")
            tensor.data_type = TensorProto.INT4
            tensor.dims[-1] *= 2
            _retype_value_infos(model, tensor.name, tensor.dims[-1])
            retyped.append(tensor.name)
    return [f"retyped {len(retyped)} packed int4 MoE weights UINT8 -> INT4"] if retyped else []


def _retype_value_infos(model, name: str, last_dim: int) -> None:
    from onnx import TensorProto

    for value in (*model.graph.input, *model.graph.value_info):
        if value.name == name:
            value.type.tensor_type.elem_type = TensorProto.INT4
            dims = value.type.tensor_type.shape.dim
            if dims:
                dims[-1].dim_value = last_dim


def parser_ops(model, mode: MoEMode) -> dict[str, str]:
    """The op types the parser will have to import, each with where it occurs."""
    functions = {(f.domain, f.name): f for f in model.functions}
    ops: dict[str, str] = {}
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type in MOE_OPS:
            if mode is MoEMode.INLINE:
                body = functions.get((node.domain, node.op_type))
                for inner in body.node if body is not None else ():
                    ops.setdefault(inner.op_type, f"the {node.op_type} function body")
            continue
        ops.setdefault(node.op_type, "the main graph")
    return ops
