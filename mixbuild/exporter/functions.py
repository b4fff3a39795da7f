"""Model-local ONNX functions for the MoE ops: sparse decompositions in standard ONNX ops.

Any ONNX runtime without mixbuild's plugins (ONNX Runtime, Polygraphy, a TensorRT parser that
inlines functions) executes these bodies, so they define the artifact's semantics exactly like
`mixbuild.model.ops`. The experts body sorts the routing slots by expert once, then is
unrolled over the E experts (E is fixed per model): each runs its SwiGLU GEMMs on its own
slice of the gathered token rows, so the work is the chosen experts' only, never a dense
all-experts product, and the node count per expert stays small (on CPU, ONNX Runtime's
per-node cost is what bounds small-batch decode).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from mixbuild.contract import DOMAIN, EXPERTS_OP, GATE_OP, OPSET

PLUGIN_ATTRS = ["plugin_namespace", "plugin_version"]


class FunctionBody:
    """A tiny node-list builder with unique value names."""

    def __init__(self, prefix: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self.count = 0

    def __call__(self, op: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        names = [f"{self.prefix}{self.count}_{i}" for i in range(outputs)]
        self.count += 1
        self.nodes.append(helper.make_node(op, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=TensorProto.INT64) -> str:
        values = value if isinstance(value, list) else [value]
        tensor = helper.make_tensor("v", dtype, [len(values)] if isinstance(value, list) else [], values)
        return self("Constant", value=tensor)

    def const_from_attr(self, attr: str, kind: str) -> str:
        """A Constant whose value is the function attribute `attr` (value_int / value_float)."""
        node = helper.make_node("Constant", [], [f"{self.prefix}{self.count}_0"])
        ref = onnx.AttributeProto(name=kind, ref_attr_name=attr,
                                  type=onnx.AttributeProto.INT if kind == "value_int"
                                  else onnx.AttributeProto.FLOAT)
        node.attribute.append(ref)
        self.count += 1
        self.nodes.append(node)
        return node.output[0]

    def output(self, op: str, name: str, *inputs: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [name], **attrs))
        return name


def _opsets(opset: int) -> list[onnx.OperatorSetIdProto]:
    """A function must import the model's own default-domain opset (the ops of the bodies
    mean the same from 21, the artifact opset, to 24, the serving layout's)."""
    return [helper.make_opsetid("", opset)]


def gate_function(opset: int = OPSET) -> onnx.FunctionProto:
    """MoEGate(router_logits [T, E]) -> (weights [T, k] float32, expert_ids [T, k] int32).

    ONNX TopK returns equal values lowest index first, which is the contract's tie rule.
    """
    b = FunctionBody("g")
    probs = b("Softmax", b("Cast", "router_logits", to=TensorProto.FLOAT), axis=-1)
    k = b("Reshape", b.const_from_attr("top_k", "value_int"), b.const([1]))
    values, indices = b("TopK", probs, k, outputs=2, axis=-1, largest=1, sorted=1)
    total = b("ReduceSum", values, b.const([-1]), keepdims=1)
    norm = b("Cast", b.const_from_attr("normalize", "value_int"), to=TensorProto.FLOAT)
    one = b.const(1.0, TensorProto.FLOAT)
    denom = b("Add", b("Mul", total, norm), b("Sub", one, norm))  # sum if normalize else 1
    b.output("Div", "weights", values, denom)
    b.output("Cast", "expert_ids", indices, to=TensorProto.INT32)
    return helper.make_function(DOMAIN, GATE_OP, ["router_logits"], ["weights", "expert_ids"],
                                b.nodes, _opsets(opset), ["top_k", "normalize", *PLUGIN_ATTRS])


class PlainWeights:
    """How the experts body sees its weights and activations: plain (unquantized) here; the
    quantizers subclass it to dequantize and fake-quantize exactly as the plugins compute."""

    extra_inputs: tuple[str, ...] = ()

    def prologue(self, b: FunctionBody) -> tuple[str, str, str]:
        """(input as the GEMMs see it, all experts' w_gate_up, all experts' w_down)."""
        return "hidden", "w_gate_up", "w_down"

    def activation(self, b: FunctionBody, x: str, which: str, expert: int) -> str:
        """The activation entering GEMM `which` ('gate_up' or 'down') of `expert`."""
        return x


def _group_by_expert(b: FunctionBody, num_experts: int) -> tuple[str, str, list[str]]:
    """Sort the T*k routing slots by expert, without NonZero (TensorRT-RTX cannot run it) or
    any reduction scatter (TensorRT's parser has none): every op here has a TensorRT importer.

    Returns (order, dest, bounds): order [S] lists the slots grouped by expert (slot order
    within an expert), dest [S] is its inverse (where slot s sits in `order`), and bounds[e],
    bounds[e + 1] ([1] each) delimit expert e's run in `order`.
    """
    ids = b("Cast", b("Reshape", "expert_ids", b.const([-1])), to=TensorProto.INT64)      # [S]
    onehot = b("Cast", b("Equal", b("Unsqueeze", ids, b.const([1])),
                         b.const(list(range(num_experts)))), to=TensorProto.INT64)        # [S, E]
    seen = b("CumSum", onehot, b.const(0))                       # [S, E] inclusive per expert
    rank = b("Sub", b("Reshape", b("GatherElements", seen, b("Unsqueeze", ids, b.const([1])),
                                   axis=1), b.const([-1])), b.const(1))  # rank within expert
    counts = b("ReduceSum", onehot, b.const([0]), keepdims=0)                             # [E]
    bounds = b("Concat", b.const([0]), b("CumSum", counts, b.const(0)), axis=0)          # [E+1]
    dest = b("Add", b("Gather", bounds, ids, axis=0), rank)                               # [S]
    size = b("Shape", ids)
    order = b("ScatterElements", b("ConstantOfShape", size, value=helper.make_tensor(
        "zero", TensorProto.INT64, [1], [0])), dest,
        b("Range", b.const(0), b("Reshape", size, b.const([])), b.const(1)), axis=0)
    parts = b("Split", bounds, outputs=num_experts + 1, axis=0, num_outputs=num_experts + 1)
    return order, dest, parts


def _swiglu(b: FunctionBody, x: str, w_gate_up: str, w_down: str, scheme: PlainWeights, e: int) -> str:
    """x [n, H] -> w_down(silu(gate) * up) [n, H] with gate/up the halves of x @ w_gate_up^T."""
    x = scheme.activation(b, x, "gate_up", e)
    gate_up = b("MatMul", x, b("Transpose", w_gate_up, perm=[1, 0]))
    gate, up = b("Split", gate_up, outputs=2, axis=1, num_outputs=2)
    act = scheme.activation(b, b("Mul", b("Mul", gate, b("Sigmoid", gate)), up), "down", e)
    return b("MatMul", act, b("Transpose", w_down, perm=[1, 0]))


def experts_function(num_experts: int, scheme: PlainWeights | None = None,
                     opset: int = OPSET) -> onnx.FunctionProto:
    """MoEExperts(hidden [T, H], weights [T, k], expert_ids [T, k], w_gate_up, w_down, ...) -> [T, H].

    `scheme` decides how the body reads the weights (plain, or dequantized from fp8 / int4).
    The T*k routing slots are grouped by expert once; each expert runs its SwiGLU GEMMs on its
    own contiguous run of gathered token rows (a Slice: an expert nobody chose costs an empty
    GEMM); the results are weighted, put back in slot order with one Gather and summed over
    the k slots of each token in float32, as the kernels combine them.
    """
    scheme = scheme or PlainWeights()
    b = FunctionBody("x")
    x_all, w_gate_up_all, w_down_all = scheme.prologue(b)
    order, dest, bounds = _group_by_expert(b, num_experts)
    k = b("Slice", b("Shape", "expert_ids"), b.const([1]), b.const([2]))                  # [1]
    x_sorted = b("Gather", x_all, b("Div", order, k), axis=0)                          # [S, H]
    outputs = []
    for e in range(num_experts):
        x = b("Slice", x_sorted, bounds[e], bounds[e + 1], b.const([0]))               # [n, H]
        index = b.const(e)
        w_gate_up = b("Gather", w_gate_up_all, index, axis=0)
        w_down = b("Gather", w_down_all, index, axis=0)
        outputs.append(b("Cast", _swiglu(b, x, w_gate_up, w_down, scheme, e), to=TensorProto.FLOAT))
    routing = b("Gather", b("Cast", b("Reshape", "weights", b.const([-1])), to=TensorProto.FLOAT),
                order, axis=0)                                                          # [S]
    y = b("Mul", b("Concat", *outputs, axis=0), b("Unsqueeze", routing, b.const([1])))  # [S, H]
    per_slot = b("Gather", y, dest, axis=0)                                  # slot order [S, H]
    shape = b("Concat", b("Shape", "expert_ids"), b.const([-1]), axis=0)             # [T, k, H]
    acc = b("ReduceSum", b("Reshape", per_slot, shape), b.const([1]), keepdims=0)
    b.output("CastLike", "out", acc, "hidden")
    inputs = ["hidden", "weights", "expert_ids", "w_gate_up", "w_down", *scheme.extra_inputs]
    attrs = ["activation", "quantization", "group_size", *PLUGIN_ATTRS]
    return helper.make_function(DOMAIN, EXPERTS_OP, inputs, ["out"], b.nodes, _opsets(opset), attrs)
