"""Per-layer diagnostics from any artifact, without re-exporting it.

The validator needs, per decoder layer i, the router logits, the chosen experts, the MoE input
and the layer's output hidden state (the `debug.{i}.*` names of `mixbuild.contract.Debug`),
and on the serving layout the logits of every position. A shipped artifact has none of these
as outputs (unless it was exported with --debug-outputs / --all-logits), but every one of them
is a value inside its graph. `expose` adds them as extra graph outputs of the private,
in-memory copy of the graph that `OrtRunner(graph_rewrite=...)` hands the session; nothing is
recomputed (the one exception is the serving layout's all-position logits, below), the weights
stay in the artifact's external data, and the artifact's files are never written.

Where the values are, found from the graph's structure (so it works for every artifact mixbuild
has written, old or new, with no name recorded at export):

- MoEGate's input 0: the router logits [T, E]; its output 1: the chosen experts [T, k]
  (MoEGate stays in the session: its output is now a graph output, even where the runtime
  runs the experts as QMoE, which routes by itself from the same router logits);
- MoEExperts' input 0: the MoE input [T, H] (the post-attention-normed hidden state);
- the first Add reached from MoEExperts' output through shape-only ops (the `view_as`
  Reshape): the residual sum, i.e. the layer's output hidden state [B, S, H];
- the layer index: from MoEExperts' expert-weight initializer name `layers.{i}.moe.…`,
  else the MoE nodes' order in the graph.

Serving layout, last-token logits (the default export): the graph gathers each row's last
valid position (GatherElements + Squeeze) before the final norm and lm_head. The copy gets a
second head on the un-gathered hidden state: the pre-gather [B, S, H] is flattened to
[B*S, H] and the nodes between the gather and `logits` (RMSNorm, lm_head Gemm: row-wise ops)
are duplicated onto it, giving `ALL_LOGITS` [B*S, V]. The shipped `logits` output is left as it
is (ServingStep still binds it for the greedy pass); the tests check that the duplicated head's
last valid row of each sequence equals the shipped `logits` bit for bit. A serving artifact
exported with --all-logits has `logits` [B, S, V] itself; its copy gets `logits` [B, V]
gathered from it (so ServingStep runs it) and the original under `ALL_LOGITS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mixbuild.contract import DOMAIN, EXPERTS_OP, GATE_OP, INPUT_LENGTHS, LOGITS, Debug
from mixbuild.errors import ArtifactError
from mixbuild.runtime.ort_attention import upstream

ALL_LOGITS = "mb_validate.all_logits"   # serving layout: [B*S, V] (row-major over [B, S])
_SHAPE_ONLY = ("Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Cast")
_LAYER = re.compile(r"^layers\.(\d+)\.moe\.")


@dataclass
class Exposed:
    """What `expose` found: output name in the session -> the validator's name for it."""

    names: dict[str, str] = field(default_factory=dict)
    all_logits: bool = False          # ALL_LOGITS is an output of the copy

    def rename(self, outputs: dict) -> dict:
        return {self.names.get(k, k): v for k, v in outputs.items()}


def find_debug_values(graph, num_layers: int) -> dict[str, str]:
    """{debug name: value name in `graph`} for the router logits, chosen experts, MoE input and
    output hidden state of every layer. ArtifactError when the graph does not have the MoE
    structure the contract describes (one MoEGate feeding one MoEExperts per layer)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in graph.node for out in node.output}
    experts = [n for n in graph.node if n.domain == DOMAIN and n.op_type == EXPERTS_OP]
    if len(experts) != num_layers:
        raise ArtifactError("the graph does not have one MoEExperts node per layer",
                            expected=f"{num_layers} MoEExperts nodes", found=str(len(experts)),
                            hint="validate artifacts written by `mixbuild export`")
    found = {}
    for order, node in enumerate(experts):
        match = _LAYER.match(node.input[3]) if len(node.input) > 3 else None
        layer = int(match.group(1)) if match else order
        gate = producers.get(node.input[2])
        if gate is None or gate.op_type != GATE_OP or gate.domain != DOMAIN:
            raise ArtifactError(f"layer {layer}: MoEExperts' expert ids do not come from MoEGate",
                                found=f"produced by {gate.op_type if gate else 'a graph input'}")
        found[Debug.ROUTER_LOGITS.name_for(layer)] = gate.input[0]
        found[Debug.EXPERT_IDS.name_for(layer)] = gate.output[1]
        found[Debug.MOE_INPUT.name_for(layer)] = node.input[0]
        found[Debug.HIDDEN.name_for(layer)] = _residual_sum(node.output[0], consumers, layer)
    missing = [i for i in range(num_layers) if Debug.HIDDEN.name_for(i) not in found]
    if missing:
        raise ArtifactError("the graph's MoE layers are not numbered 0 .. layers-1",
                            found=f"no MoE node for layer(s) {missing}")
    return found


def _residual_sum(value: str, consumers: dict, layer: int) -> str:
    seen = value
    for _ in range(8):
        nodes = consumers.get(seen, [])
        add = next((n for n in nodes if n.op_type == "Add"), None)
        if add is not None:
            return add.output[0]
        shape = [n for n in nodes if n.op_type in _SHAPE_ONLY]
        if len(shape) != 1:
            break
        seen = shape[0].output[0]
    raise ArtifactError(f"layer {layer}: cannot find the residual Add after MoEExperts",
                        hint="validate artifacts written by `mixbuild export`")


def expose(model, num_layers: int, act_elem_type: int, serving: bool, all_logits: bool) -> Exposed:
    """Add the per-layer debug values (and, serving, the all-position logits) as outputs of
    `model` (an onnx ModelProto, the session's private copy; changed in place). Values that
    already are graph outputs (an artifact exported with --debug-outputs) are reused."""
    from onnx import TensorProto, helper

    graph = model.graph
    outputs = {o.name for o in graph.output}
    exposed = Exposed()
    for debug_name, value in find_debug_values(graph, num_layers).items():
        if debug_name in outputs:          # exported with --debug-outputs: already there
            continue
        if value not in outputs:
            elem = TensorProto.INT32 if debug_name.endswith(Debug.EXPERT_IDS.value) else act_elem_type
            graph.output.append(helper.make_tensor_value_info(value, elem, None))
            outputs.add(value)
        exposed.names[value] = debug_name
    if serving:
        (_gathered_last if all_logits else _second_head)(graph)
        exposed.all_logits = True
    return exposed


def _second_head(graph) -> None:
    """ALL_LOGITS [B*S, V]: the final norm and lm_head duplicated on the un-gathered hidden
    state (see the module docstring)."""
    from onnx import TensorProto, helper

    producers = {out: node for node in graph.node for out in node.output}
    gather = _last_token_gather(graph, producers)
    hidden_in = gather.input[0]
    between = upstream(producers, [LOGITS]) & _downstream(graph, gather.output[0])
    head = [n for n in graph.node if id(n) in between]
    squeeze = next((n for n in head if n.op_type == "Squeeze" and n.input[0] == gather.output[0]),
                   None)
    start = squeeze.output[0] if squeeze is not None else gather.output[0]
    head = [n for n in head if n is not squeeze]
    rename = {start: "mb_validate.flat_hidden", LOGITS: ALL_LOGITS}
    new = [helper.make_node("Shape", [hidden_in], ["mb_validate.hidden_size"], start=2, end=3),
           helper.make_node("Constant", [], ["mb_validate.minus_one"],
                            value=helper.make_tensor("v", TensorProto.INT64, [1], [-1])),
           helper.make_node("Concat", ["mb_validate.minus_one", "mb_validate.hidden_size"],
                            ["mb_validate.flat_dims"], axis=0),
           helper.make_node("Reshape", [hidden_in, "mb_validate.flat_dims"],
                            ["mb_validate.flat_hidden"])]
    for node in head:
        copy = helper.make_node(node.op_type, [rename.get(i, i) for i in node.input],
                                [_renamed(o, rename) for o in node.output],
                                name=f"mb_validate.{node.name or node.op_type}", domain=node.domain)
        copy.attribute.extend(node.attribute)
        new.append(copy)
    graph.node.extend(new)
    graph.output.append(helper.make_tensor_value_info(ALL_LOGITS, TensorProto.FLOAT, None))


def _renamed(name: str, rename: dict) -> str:
    rename.setdefault(name, f"mb_validate.{name}")
    return rename[name]


def _downstream(graph, value: str) -> set:
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found, stack = set(), [value]
    while stack:
        for node in consumers.get(stack.pop(), []):
            if id(node) not in found:
                found.add(id(node))
                stack.extend(node.output)
    return found


def _last_token_gather(graph, producers):
    """The serving graph's GatherElements of each row's last valid position (input_lengths - 1)."""
    before_logits = upstream(producers, [LOGITS])
    for node in graph.node:
        if node.op_type in ("GatherElements", "Gather") and id(node) in before_logits and \
                INPUT_LENGTHS in _inputs_above(producers, node.input[1]):
            return node
    raise ArtifactError("the serving graph has no last-token gather before the lm_head",
                        hint="validate artifacts written by `mixbuild export --layout serving`")


def _inputs_above(producers, value: str) -> set:
    names, stack, seen = set(), [value], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is None:
            names.add(name)
        else:
            stack.extend(i for i in node.input if i)
    return names


def _gathered_last(graph) -> None:
    """An --all-logits serving artifact: its [B, S, V] logits become ALL_LOGITS (flattened), and
    `logits` [B, V] is gathered at each row's last valid position, as the default export's."""
    from onnx import TensorProto, helper

    for node in graph.node:
        node.output[:] = ["mb_validate.all_logits_3d" if o == LOGITS else o for o in node.output]
        node.input[:] = ["mb_validate.all_logits_3d" if i == LOGITS else i for i in node.input]
    i64 = TensorProto.INT64
    for output in graph.output:
        if output.name == LOGITS:           # now [B, V]
            output.type.tensor_type.ClearField("shape")

    def const(name, values):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(
            "v", i64, [len(values)], values))
    graph.node.extend([
        const("mb_validate.one", [1]), const("mb_validate.zero", [0]),
        const("mb_validate.axes12", [1, 2]), const("mb_validate.minus_one", [-1]),
        helper.make_node("Sub", [INPUT_LENGTHS, "mb_validate.one"], ["mb_validate.last0"]),
        helper.make_node("Max", ["mb_validate.last0", "mb_validate.zero"], ["mb_validate.last"]),
        helper.make_node("Unsqueeze", ["mb_validate.last", "mb_validate.axes12"],
                         ["mb_validate.last3"]),
        helper.make_node("Shape", ["mb_validate.all_logits_3d"], ["mb_validate.vocab"], start=2, end=3),
        helper.make_node("Shape", [INPUT_LENGTHS], ["mb_validate.batch"]),
        helper.make_node("Concat", ["mb_validate.batch", "mb_validate.one", "mb_validate.vocab"],
                         ["mb_validate.index_shape"], axis=0),
        helper.make_node("Expand", ["mb_validate.last3", "mb_validate.index_shape"],
                         ["mb_validate.index"]),
        helper.make_node("GatherElements", ["mb_validate.all_logits_3d", "mb_validate.index"],
                         ["mb_validate.gathered"], axis=1),
        helper.make_node("Squeeze", ["mb_validate.gathered", "mb_validate.one"], [LOGITS]),
        helper.make_node("Concat", ["mb_validate.minus_one", "mb_validate.vocab"],
                         ["mb_validate.flat_dims"], axis=0),
        helper.make_node("Reshape", ["mb_validate.all_logits_3d", "mb_validate.flat_dims"],
                         [ALL_LOGITS]),
    ])
    graph.output.append(helper.make_tensor_value_info(ALL_LOGITS, TensorProto.FLOAT, None))
