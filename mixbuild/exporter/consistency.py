"""The manifest against the graph it describes: mixbuild.json must say what model.onnx is.

The file hashes in mixbuild.json prove that the other files are the ones exported, but nothing
proves the manifest itself: an edited precision, top_k, vocab_size, dtype or layer count would
make the builder and the runtime treat the graph as something it is not. `check_graph` reads
the graph without its weights (onnx.load(load_external_data=False): the initializers' dims,
types and external-data locations stay in the protobuf) and refuses every field that
contradicts it, naming the field, what the graph holds (expected) and what the manifest says
(found):

    layer count   spec.num_layers = MoEGate nodes = MoEExperts nodes
    dtype         the element type of the past key / value inputs
    precision     fp8: FLOAT8E4M3FN initializers or QuantizeLinear nodes; int4: INT4
                  initializers; a float artifact neither, and its precision is its dtype
    MoE nodes     MoEGate top_k = spec.top_k; MoEExperts quantization = the precision's
                  scheme, group_size = quantization.group_size (int4) or 0
    experts       MoEExperts w_gate_up [E, 2I, H] and w_down [E, H, I]: num_experts,
                  intermediate_size, hidden_size
    vocab_size    the last dim of logits
    debug_outputs whether the graph has debug.* outputs
    inputs, outputs  names, order, dtypes (and the graph's dims) = contract.io_specs
    opset         the graph's opset imports
    files         every external data file the graph reads is listed (so hash-checked)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixbuild.contract import (
    DOMAIN,
    EXPERTS_OP,
    GATE_OP,
    LOGITS,
    MANIFEST_FILE,
    ONNX_FILE,
    DType,
    Precision,
    TensorSpec,
    io_specs,
    is_kv_input,
)
from mixbuild.errors import ArtifactError
from mixbuild.exporter.manifest import ArtifactManifest, mismatch
from mixbuild.model.spec import MixtralSpec
from mixbuild.schemes import Scheme, scheme_of

_HINT = "the manifest was edited or belongs to another export; export the artifact again"


@dataclass(frozen=True)
class GraphFacts:
    """What the manifest is checked against, read from model.onnx without its weights."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    gates: list[dict[str, Any]]                  # attributes of each MoEGate node
    experts: list[dict[str, Any]]                # attributes of each MoEExperts node
    expert_weights: list[tuple[list, list]]      # (w_gate_up dims, w_down dims) per node
    initializer_types: set[str]
    quantize_nodes: int
    opset: dict[str, int]
    external_files: set[str]


def read_graph(onnx_path: Path) -> GraphFacts:
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError
        raise ArtifactError(f"{onnx_path} is not a readable ONNX model",
                            found=f"{type(exc).__name__}: {str(exc)[:200]}",
                            hint="export the artifact again") from exc
    graph = model.graph
    dims = {t.name: list(t.dims) for t in graph.initializer}

    def attrs(node) -> dict[str, Any]:
        values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}

    def tensor(value) -> TensorSpec:
        kind = value.type.tensor_type
        shape = tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
                      for d in kind.shape.dim)
        return TensorSpec(value.name, _dtype_name(kind.elem_type), shape)

    custom = [n for n in graph.node if n.domain == DOMAIN]
    experts = [n for n in custom if n.op_type == EXPERTS_OP]
    return GraphFacts(
        inputs=[tensor(v) for v in graph.input], outputs=[tensor(v) for v in graph.output],
        gates=[attrs(n) for n in custom if n.op_type == GATE_OP],
        experts=[attrs(n) for n in experts],
        expert_weights=[(dims.get(n.input[3]) if len(n.input) > 4 else None,
                         dims.get(n.input[4]) if len(n.input) > 4 else None) for n in experts],
        initializer_types={onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer},
        quantize_nodes=sum(n.op_type == "QuantizeLinear" for n in graph.node),
        opset={o.domain: o.version for o in model.opset_import},
        external_files={e.value for t in graph.initializer for e in t.external_data
                        if e.key == "location"},
    )


def _dtype_name(elem_type: int) -> str:
    """The contract's (numpy) spelling of an ONNX element type."""
    import onnx

    names = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
             onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.DOUBLE: "float64",
             onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}
    return names.get(elem_type) or onnx.TensorProto.DataType.Name(elem_type).lower()


def graph_precision(facts: GraphFacts, dtype: DType) -> Precision:
    """What the graph's weights are: fp8 / int4 from their initializers (and fp8's activation
    QuantizeLinear nodes), otherwise the float precision of `dtype`."""
    if "FLOAT8E4M3FN" in facts.initializer_types or facts.quantize_nodes:
        return Precision.FP8
    if "INT4" in facts.initializer_types:
        return Precision.INT4
    return Precision.of_dtype(dtype)


def check_graph(directory: Path, manifest: ArtifactManifest,
                facts: GraphFacts | None = None) -> None:
    """Refuse (ArtifactError naming the field) a manifest that contradicts model.onnx."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    facts = facts or read_graph(directory / ONNX_FILE)

    def refuse(name: str, expected: str, found: Any) -> ArtifactError:
        return mismatch(path, name, expected, found, hint=_HINT)

    spec, dtype = manifest.spec, manifest.dtype
    layers = len(facts.gates)
    if layers != spec.num_layers or len(facts.experts) != spec.num_layers:
        raise refuse("spec.num_layers", f"{layers} (model.onnx has {layers} {GATE_OP} and "
                     f"{len(facts.experts)} {EXPERTS_OP} nodes, one of each per layer)",
                     spec.num_layers)
    kv = [t for t in facts.inputs if is_kv_input(t.name)]
    if kv and kv[0].dtype != dtype.value:
        raise refuse("dtype", f"{kv[0].dtype} (the element type of model.onnx's {kv[0].name})",
                     dtype.value)
    if kv and len(kv[0].dims) == 4:
        for name, axis in (("num_kv_heads", 1), ("head_dim", 3)):
            if kv[0].dims[axis] != getattr(spec, name):
                raise refuse(f"spec.{name}", f"{kv[0].dims[axis]} (dim {axis} of model.onnx's "
                             f"{kv[0].name}, {list(kv[0].dims)})", getattr(spec, name))
    precision, found = graph_precision(facts, dtype), manifest.precision
    if precision is not found:
        held = (", ".join(sorted(t for t in facts.initializer_types if t in ("FLOAT8E4M3FN", "INT4")))
                or "no FLOAT8E4M3FN or INT4")
        raise refuse("precision", f"{precision.value} (model.onnx has {held} initializers and "
                     f"{facts.quantize_nodes} QuantizeLinear nodes)", found.value)
    scheme = scheme_of(precision)
    group = _check_quantization(refuse, manifest.quantization, precision, scheme)
    for layer, (gate, experts) in enumerate(zip(facts.gates, facts.experts)):
        if gate.get("top_k") != spec.top_k:
            raise refuse("spec.top_k", f"{gate.get('top_k')} (the top_k attribute of model.onnx's "
                         f"{GATE_OP} node of layer {layer})", spec.top_k)
        if experts.get("quantization") != scheme.moe.value:
            raise refuse("precision", f"a precision whose MoE weights are "
                         f"{experts.get('quantization')} (the quantization attribute of "
                         f"model.onnx's {EXPERTS_OP} node of layer {layer})", precision.value)
        if experts.get("group_size", 0) != group:
            name, held = (("quantization.group_size", group) if group
                          else ("precision", precision.value))
            raise refuse(name, f"{experts.get('group_size', 0)} (the group_size attribute of "
                         f"model.onnx's {EXPERTS_OP} node of layer {layer})", held)
    _check_expert_shapes(facts, spec, refuse)
    logits = next((t for t in facts.outputs if t.name == LOGITS), None)
    if logits is not None and logits.dims and logits.dims[-1] != spec.vocab_size:
        raise refuse("spec.vocab_size", f"{logits.dims[-1]} (the last dim of model.onnx's "
                     f"{LOGITS} output)", spec.vocab_size)
    debug = any(t.name.startswith("debug.") for t in facts.outputs)
    if debug != manifest.debug_outputs:
        raise refuse("debug_outputs", f"{str(debug).lower()} (model.onnx "
                     f"{'has' if debug else 'has no'} debug.* outputs)", manifest.debug_outputs)
    inputs, outputs = io_specs(spec, dtype, debug, manifest.layout, manifest.all_logits)
    for key, wanted, held, graph in (("inputs", inputs, manifest.inputs, facts.inputs),
                                     ("outputs", outputs, manifest.outputs, facts.outputs)):
        _check_io(refuse, key, wanted, held, graph)
    for domain, version in manifest.opset.items():
        if facts.opset.get(domain) != version:
            raise refuse(f"opset.{domain or 'ai.onnx'}", f"{facts.opset.get(domain)} (model.onnx's "
                         f"opset import of domain '{domain}')", version)
    unlisted = sorted(facts.external_files - set(manifest.files))
    if unlisted:
        raise refuse("files", f"every file model.onnx reads listed with its sha256 (it reads "
                     f"{', '.join(unlisted)})", sorted(manifest.files))


def _check_quantization(refuse, quant: dict | None, precision: Precision, scheme: Scheme) -> int:
    """The manifest's quantization settings agree with the precision; returns the MoEExperts
    group_size they imply (a grouped scheme's group size, else 0)."""
    if not precision.quantized:
        if quant is not None:
            raise refuse("quantization", f"null (a {precision.value} artifact is not quantized)", quant)
        return 0
    if quant is None:
        raise refuse("quantization", f"the quantization settings of the {precision.value} artifact",
                     None)
    if quant.get("precision") != precision.value:
        raise refuse("quantization.precision", precision.value, quant.get("precision"))
    if not scheme.grouped:
        return 0
    group = quant.get("group_size")
    if not isinstance(group, int) or isinstance(group, bool) or group <= 0:
        raise refuse("quantization.group_size", f"the {scheme.name} group size, a positive "
                     "integer", group)
    return group


def _check_expert_shapes(facts: GraphFacts, spec: MixtralSpec, refuse) -> None:
    e, i, h = spec.num_experts, spec.intermediate_size, spec.hidden_size
    for layer, (gate_up, down) in enumerate(facts.expert_weights):
        if gate_up is None or down is None or len(gate_up) != 3 or len(down) != 3:
            continue   # not initializers: nothing to read the sizes from
        where = f"model.onnx's {EXPERTS_OP} weights of layer {layer}: w_gate_up {gate_up}, w_down {down}"
        for name, held, value in (("num_experts", gate_up[0], e), ("hidden_size", gate_up[2], h),
                                  ("intermediate_size", down[2], i)):
            if held != value:
                raise refuse(f"spec.{name}", f"{held} ({where})", value)
        if gate_up != [e, 2 * i, h] or down != [e, h, i]:
            raise refuse("spec", f"experts of shape [{e}, {2 * i}, {h}] and [{e}, {h}, {i}] "
                         f"({where})", f"num_experts {e}, intermediate_size {i}, hidden_size {h}")


def _check_io(refuse, key: str, wanted: list[TensorSpec], listed: list[dict],
              graph: list[TensorSpec]) -> None:
    """The manifest's list and the graph's inputs (outputs) are the contract's, in order."""
    names = [t.name for t in wanted]
    for index, (want, entry) in enumerate(zip(wanted, listed)):
        if entry != want.to_dict():
            raise refuse(f"{key}[{index}]", f"{want.to_dict()} (contract.io_specs of the spec, "
                         "dtype and debug_outputs)", entry)
    if len(listed) != len(wanted):
        raise refuse(key, f"{len(wanted)} entries: {_names(names)}", _names([e["name"] for e in listed]))
    for index, (want, held) in enumerate(zip(wanted, graph)):
        if (held.name, held.dtype) != (want.name, want.dtype) or not _dims_match(want.dims, held.dims):
            raise refuse(f"{key}[{index}]", f"{held.name} {held.dtype} {list(held.dims)} (model.onnx's "
                         f"{key[:-1]} {index})", f"{want.name} {want.dtype} {list(want.dims)}")
    if len(graph) != len(wanted):
        raise refuse(key, f"{len(graph)} entries, as model.onnx has: "
                     f"{_names([t.name for t in graph])}", _names(names))


def _dims_match(wanted: tuple, held: tuple) -> bool:
    """Fixed sizes must agree; a symbolic dim matches any symbolic or unknown dim."""
    return len(wanted) == len(held) and all(
        w == h or (isinstance(w, str) and isinstance(h, str)) for w, h in zip(wanted, held))


def _names(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:5])}, ... ({len(names)} in all)"
