"""ONNX Runtime's fast kernels for quantized artifacts, chosen when a session is made: the
graph rewrites the schemes (mixbuild.schemes.fp8 / int4) call from their `ort_*` methods.

A quantized artifact is portable: standard ONNX plus mixbuild's MoE ops, whose function
bodies define the numerics (the schemes' `onnx_*` methods). ONNX Runtime runs those
bodies as written, and the INT4 experts body dequantizes every expert's whole weight tensor
to float32 on every call: on a ~338M-parameter model an int4 decode step spent 317 of its
579 ms in DequantizeLinear. This module rewrites a private, in-memory copy of the graph; the
artifact's files are never changed, and TensorRT still sees the mixbuild ops.

INT4 experts -> com.microsoft.QMoE (int4, block-wise, ONNX Runtime 1.32 CPU kernel):
    the same numbers as the body (checked against it to ~1e-5 on the fixture, in the tests):
    - weights: mixbuild's INT4 [E, N, K] (signed, two per byte, low nibble first) are
      QMoE's raw uint8 [E, N, K/2] layout with the default zero point 8 once every nibble's
      sign bit is flipped (u = q + 8, i.e. byte ^ 0x88): dequantized (u - 8) * s = q * s;
    - scales [E, N, K/G] as they are (cast to the activation type), block_size = G;
    - SwiGLU: w_gate_up's rows are [gate | up]; the CPU kernel takes them interleaved
      (swiglu_fusion=1: gate_0, up_0, gate_1, ...), activation_alpha 1, activation_beta 0 and
      no limit, which is silu(gate) * up;
    - routing: QMoE takes the router logits and computes softmax -> top-k -> renormalise,
      which is MoEGate with normalize=1 (the only case rewritten);
    - accuracy_level 1: float32 activations (weight-only, the contract's W4A16), unless the
      caller asks for 4 (int8 activations, faster, not the contract's numerics).
    Only the experts a token chose are computed, and the int4 bytes are what stays resident:
    the rewritten initializers go to the session as OrtValues over numpy arrays
    (SessionOptions.add_external_initializers), with no float copy.

INT4 linears outside the MoE: ONNX Runtime fuses DequantizeLinear(int4, blocked, axis 0) +
MatMul into MatMulNBits by itself; its accuracy level is a session setting whose default is
4 (int8 activations). The int4 scheme's `ort_session` sets it explicitly, to 1 by default (W4A16). An
int4 lm_head (`--lm-head int4`) is one more such linear.

INT8 lm_head (`--lm-head int8`) -> MatMulNBits(bits=8, accuracy_level=4), by this module
(`rewrite_int8_linears`): ONNX Runtime would fuse it by itself at the session's level, and at
level 1 its 8-bit kernel is no kernel (a 32000 x 1024 head: 128 ms, float32 6 ms, level 4
1.1 ms), so the int8 head always runs with int8 activations on this provider.

FP8 (W8A8) has no fast kernel with the contract's numerics in ONNX Runtime 1.32's CPU
provider: QMoE's fp8 mode is weight-only (it would drop the activation quantization the
contract defines) and there is no FP8 GEMM. What it does run fast is float32 GEMMs, so for an
fp8 artifact the session folds the constant weight dequantization once, at load
(session.disable_quant_qdq: ONNX Runtime's constant folding then also folds
DequantizeLinear), and keeps the activations' QuantizeLinear / DequantizeLinear per call.
The numbers are those of the body (the same float32 products, computed once); the price is
memory: the folded weights are float32, 4x the fp8 bytes (measured and stated in
benchmarks/quantized_decode.py). fast_quantized=False keeps the fp8 bytes resident and
dequantizes every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixbuild.contract import DOMAIN, EXPERTS_OP, GATE_OP
from mixbuild.tensors import initializer_array

W4A16 = 1          # MatMulNBits / QMoE accuracy_level: float32 activations (contract.ACCURACY_LEVELS)
MATMULNBITS_LEVEL = "session.qdq_matmulnbits_accuracy_level"
FOLD_DEQUANTIZE = "session.disable_quant_qdq"   # constant folding then folds DequantizeLinear


@dataclass
class Rewrite:
    """What was replaced, and the new initializers (name -> array) the session must get."""

    experts: int = 0
    linears: int = 0
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _qmoe_eligible(experts, gate, inits: dict) -> str | None:
    """Why this MoE cannot become QMoE (None: it can)."""
    from onnx import TensorProto

    attrs, gate_attrs = _attrs(experts), _attrs(gate) if gate is not None else {}
    if gate is None:
        return "its routing weights do not come from MoEGate"
    if attrs.get("quantization", b"").decode() != "int4":
        return "not int4"
    if gate_attrs.get("normalize") != 1:
        return "MoEGate without renormalisation"
    if attrs.get("activation", b"silu").decode() != "silu":
        return "activation is not silu"
    names = list(experts.input[3:7])
    if len(names) < 4 or any(n not in inits for n in names):
        return "weights are not initializers"
    w_gate_up, w_down = inits[names[0]], inits[names[1]]
    if w_gate_up.data_type != TensorProto.INT4 or w_down.data_type != TensorProto.INT4:
        return "weights are not INT4 tensors"
    if any(t.data_location != TensorProto.EXTERNAL for t in (w_gate_up, w_down)):
        return "weights are not in the external data file (packed bytes expected)"
    group = int(attrs.get("group_size", 0))
    hidden, inter = w_gate_up.dims[2], w_down.dims[2]
    if group < 16 or group & (group - 1) or hidden % group or inter % group:
        return f"group size {group} (QMoE needs a power of two >= 16 dividing H and I)"
    return None


def rewrite_int4_experts(model, directory: Path, act_dtype, accuracy_level: int = W4A16) -> Rewrite:
    """Replace every eligible int4 MoEExperts node of `model` (an onnx ModelProto without its
    external data loaded; changed in place) by QMoE. `directory` holds the external data;
    `act_dtype` is the artifact's activation type (numpy), QMoE's T."""
    from onnx import helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    out = Rewrite()
    nodes, dropped = [], set()
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type != EXPERTS_OP:
            nodes.append(node)
            continue
        gate = producers.get(node.input[1])
        gate = gate if gate is not None and gate.op_type == GATE_OP else None
        why = _qmoe_eligible(node, gate, inits)
        if why is not None:
            out.notes.append(f"{node.output[0]}: kept its body ({why})")
            nodes.append(node)
            continue
        act = np.dtype(act_dtype)
        w_gate_up, w_down, s_gate_up, s_down = (inits[n] for n in node.input[3:7])
        experts, rows, _ = w_gate_up.dims
        inter = rows // 2
        fc1 = initializer_array(w_gate_up, directory) ^ 0x88          # packed [E, 2I, H/2]
        fc1_scale = initializer_array(s_gate_up, directory).astype(act)
        # [gate | up] rows -> interleaved gate_0, up_0, gate_1, up_1, ... (swiglu_fusion=1)
        fc1 = fc1.reshape(experts, 2, inter, -1).transpose(0, 2, 1, 3).reshape(experts, rows, -1)
        fc1_scale = fc1_scale.reshape(experts, 2, inter, -1).transpose(0, 2, 1, 3).reshape(
            experts, rows, -1)
        fc2 = initializer_array(w_down, directory) ^ 0x88             # packed [E, H, I/2]
        fc2_scale = initializer_array(s_down, directory).astype(act)
        tag = f"mb_qmoe.{node.output[0]}"
        names = [f"{tag}.fc1", f"{tag}.fc1_scale", f"{tag}.fc2", f"{tag}.fc2_scale"]
        for name, array in zip(names, (fc1, fc1_scale, fc2, fc2_scale)):
            array = np.ascontiguousarray(array)
            out.initializers[name] = array
            graph.initializer.append(_placeholder(name, array))
        dropped.update(node.input[3:7])
        gate_attrs = _attrs(gate)
        nodes.append(helper.make_node(
            "QMoE", [node.input[0], gate.input[0], names[0], names[1], "", names[2], names[3]],
            [node.output[0]], name=tag, domain="com.microsoft", k=int(gate_attrs["top_k"]),
            activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
            normalize_routing_weights=1, expert_weight_bits=4,
            block_size=int(_attrs(node)["group_size"]), accuracy_level=int(accuracy_level)))
        out.experts += 1
    if out.experts:
        _replace_nodes(model, nodes, dropped)
    return out


def _replace_nodes(model, nodes: list, dropped: set) -> None:
    """The graph's nodes become `nodes`; the initializers in `dropped` that no node reads any
    more go; the com.microsoft domain is imported."""
    from onnx import helper

    graph = model.graph
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name not in dropped or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def rewrite_int8_linears(model, directory: Path, act_dtype, out: Rewrite | None = None) -> Rewrite:
    """Replace each MatMul(x, DequantizeLinear(W_int8 [K, N], s [K/G, N], axis 0, block G))
    (an int4 artifact's `--lm-head int8`) by MatMulNBits(bits=8, accuracy_level 4); `out`
    collects the new initializers (B: unsigned codes q + 128 [N, K/G, G], MatMulNBits' default
    zero point 128; scales [N * K/G]).

    Always accuracy level 4 (int8 activations): ONNX Runtime 1.32's CPU provider has no
    float32-activation 8-bit kernel, and the fusion it would do by itself at level 1 ran a
    32000 x 1024 lm_head in 128 ms against 6 ms for float32 (1.1 ms at level 4)."""
    from onnx import TensorProto, helper

    out = out if out is not None else Rewrite()
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    replaced, dropped = {}, set()
    for dq in graph.node:
        weight = inits.get(dq.input[0]) if dq.op_type == "DequantizeLinear" and dq.input else None
        if weight is None or weight.data_type != TensorProto.INT8:
            continue
        users = consumers.get(dq.output[0], [])
        attrs = _attrs(dq)
        k, n = weight.dims
        group = int(attrs.get("block_size", 0))
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[1] != dq.output[0] \
                or attrs.get("axis") != 0 or len(dq.input) != 2 or dq.input[1] not in inits:
            out.notes.append(f"{dq.output[0]}: int8 weights kept as DequantizeLinear (not a "
                             "blocked weight feeding one MatMul)")
            continue
        if group < 16 or group & (group - 1) or k % group:
            out.notes.append(f"{dq.output[0]}: int8 weights kept as DequantizeLinear (block size "
                             f"{group}: MatMulNBits needs a power of two >= 16 dividing K = {k})")
            continue
        codes = initializer_array(weight, directory).astype(np.int16).T + 128      # [N, K]
        b = np.ascontiguousarray(codes.astype(np.uint8).reshape(n, k // group, group))
        scale = initializer_array(inits[dq.input[1]], directory).astype(np.dtype(act_dtype))
        scale = np.ascontiguousarray(scale.T).reshape(-1)                         # [N * K/G]
        matmul = users[0]
        tag = f"mb_nbits8.{matmul.output[0]}"
        for name, array in ((f"{tag}.B", b), (f"{tag}.scales", scale)):
            out.initializers[name] = array
            graph.initializer.append(_placeholder(name, array))
        replaced[id(matmul)] = helper.make_node(
            "MatMulNBits", [matmul.input[0], f"{tag}.B", f"{tag}.scales"], list(matmul.output),
            name=tag, domain="com.microsoft", K=k, N=n, bits=8, block_size=group,
            accuracy_level=4)
        replaced[id(dq)] = None
        dropped.update(dq.input)
        out.linears += 1
    if out.linears:
        nodes = [replaced.get(id(node), node) for node in graph.node]
        _replace_nodes(model, [n for n in nodes if n is not None], dropped)
    return out


def _placeholder(name: str, array: np.ndarray):
    """An initializer without data, marked external: ONNX Runtime replaces it with the OrtValue
    given to add_external_initializers (it never reads the location)."""
    from onnx import TensorProto, helper

    tensor = TensorProto(name=name, dims=list(array.shape),
                         data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="in-memory")
    return tensor
