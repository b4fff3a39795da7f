"""Turn a traced float graph into an FP8 or INT4 one, with lazily quantized initializers.

Outside the MoE ops every attention linear `MatMul(x, Transpose(W))` becomes the explicit
quantization pattern TensorRT expects, with the weight stored pre-transposed [K, N]:

    fp8:  MatMul(DQ(Q(x, s_x), s_x), DQ(W_fp8 [K, N], s_w [N]))      (W8A8, static s_x)
    int4: MatMul(x, DQ(W_int4 [K, N], s [K/G, N], axis=0, block_size=G))   (W4A16)

The router (gate), embeddings, norms and lm_head stay in the graph's float type (int4 with
`QuantConfig.lm_head` int4 / int8: lm_head becomes a linear of that pattern, with blocked
int4 or int8 weights). The MoE nodes
get quantized expert weights and scales as extra inputs (layouts of mixbuild.plugins.formats)
and a function body that dequantizes as the plugins do. AWQ smoothing scales are folded into
the weights here, so nothing extra runs at inference.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from mixbuild.contract import DOMAIN, EXPERTS_OP
from mixbuild.quant.calibrate import LayerCalibration
from mixbuild.quant.config import QuantConfig
from mixbuild.quant.quantize import QuantStore, SmoothedWeights
from mixbuild.schemes import Scheme

_LINEAR = re.compile(r"layers\.(\d+)\.attn\.([qkvo])_proj\.weight")
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
LM_HEAD = "lm_head.weight"
ACT_INPUT = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in"}


class GraphQuantizer:
    def __init__(self, onnx_model, ckpt, calibration: list[LayerCalibration], config: QuantConfig,
                 act_dtype: torch.dtype, store: QuantStore) -> None:
        self.model, self.graph = onnx_model, onnx_model.graph
        self.spec, self.config, self.calibration = ckpt.spec, config, calibration
        self.act_dtype = act_dtype
        self.weights = SmoothedWeights(ckpt, calibration)
        self.scheme = config.scheme
        self.store = store

    def _scheme(self, name: str) -> Scheme:
        """How the linear `name` is quantized (lm_head: its own scheme)."""
        return self.config.head_scheme if name == LM_HEAD else self.scheme

    def _linear(self, name: str, part: int) -> torch.Tensor:
        return self._scheme(name).linear_layout(*self.store.get(name))[part]

    def _experts(self, name: str, part: int) -> torch.Tensor:
        return self.store.get(name)[part]

    # -------------------------------------------------------------- graph edits
    def _initializer(self, name: str, loader: Callable[[], torch.Tensor], shape, dtype):
        import onnx_ir as ir

        from mixbuild.tensors import lazy_tensor

        ir_dtype = (ir.DataType.INT4 if dtype == "int4"
                    else ir.tensor_adapters.from_torch_dtype(dtype))
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir_dtype),
                         const_value=lazy_tensor(loader, dtype, shape, name))
        self.graph.register_initializer(value)
        return value

    def _constant(self, name: str, array: torch.Tensor):
        import onnx_ir as ir
        from onnx_ir.tensor_adapters import TorchTensor

        value = ir.Value(name=name, shape=ir.Shape(list(array.shape)),
                         const_value=TorchTensor(array.contiguous(), name=name))
        value.type = ir.TensorType(value.const_value.dtype)
        self.graph.register_initializer(value)
        return value

    def _act_scale(self, name: str, amax: float):
        return self._constant(name, torch.tensor(self.scheme.activation_scale(amax),
                                                 dtype=self.act_dtype))

    def quantize_linears(self) -> int:
        import onnx_ir as ir

        count = 0
        for node in list(self.graph):
            source = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
            if source is None or not source.is_initializer():
                continue
            match = _LINEAR.fullmatch(source.name)
            if match is None and not (self.config.lm_head.quantized and source.name == LM_HEAD):
                continue
            weight_dq = self._weight_dequantize(node, source.name)
            for user in list(node.outputs[0].consumers()):
                x = user.inputs[0]
                if self._scheme(source.name).quantizes_activations:   # static scales, W8A8
                    layer, proj = int(match[1]), match[2]
                    amax = self.calibration[layer].amax[ACT_INPUT[proj]]
                    scale = self._act_scale(f"{source.name}.input_scale", amax)
                    q = ir.node("QuantizeLinear", [x, scale],
                                {"output_dtype": ir.DataType.FLOAT8E4M3FN.value})
                    dq = ir.node("DequantizeLinear", [q.outputs[0], scale])
                    self.graph.insert_before(user, [q, dq])
                    user.replace_input_with(0, dq.outputs[0])
                user.replace_input_with(1, weight_dq.outputs[0])
            self.graph.remove(node, safe=True)
            del self.graph.initializers[source.name]
            count += 1
        return count + (self._quantize_gemm_head() if self.config.lm_head.quantized else 0)

    def _quantize_gemm_head(self) -> int:
        """The serving layout's lm_head is Gemm(x, W [V, H], transB=1) (no bias): it becomes
        MatMul(x, DQ(W_q [H, V])) (int4 or int8), the pattern of the attention linears."""
        import onnx_ir as ir

        for node in list(self.graph):
            if node.op_type != "Gemm" or len(node.inputs) != 2 or node.inputs[1] is None or \
                    node.inputs[1].name != LM_HEAD:
                continue
            attrs = {name: attr.value for name, attr in node.attributes.items()}
            if attrs.get("transA", 0) or not attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0:
                raise RuntimeError(f"unexpected lm_head Gemm attributes {attrs}")  # tracer changed
            weight_dq = self._weight_dequantize(node, LM_HEAD)
            matmul = ir.node("MatMul", [node.inputs[0], weight_dq.outputs[0]], name=node.name)
            self.graph.insert_before(node, matmul)
            node.outputs[0].replace_all_uses_with(matmul.outputs[0], replace_graph_outputs=True)
            out = matmul.outputs[0]
            out.type, out.shape = node.outputs[0].type, node.outputs[0].shape
            name = node.outputs[0].name
            node.outputs[0].name = None
            out.name = name   # `logits` keeps its name
            self.graph.remove(node, safe=True)
            del self.graph.initializers[LM_HEAD]
            return 1
        return 0

    def _weight_dequantize(self, anchor, name: str):
        """DQ of the quantized weight `name` (stored [N, K]), in the graph before `anchor`."""
        import onnx_ir as ir

        n, k = self.graph.initializers[name].shape
        scheme = self._scheme(name)
        weight = self._initializer(f"{name}.quantized", lambda: self._linear(name, 0), [k, n],
                                   scheme.linear_weight_type)
        shape, attrs = scheme.linear_scale(n, k, self.config)
        scale = self._initializer(f"{name}.scale", lambda: self._linear(name, 1), shape,
                                  self.act_dtype)
        dq = ir.node("DequantizeLinear", [weight, scale], attrs)
        self.graph.insert_before(anchor, dq)
        return dq

    def quantize_experts(self) -> int:
        count = 0
        for node in self.graph:
            if node.domain != DOMAIN or node.op_type != EXPERTS_OP:
                continue
            layer = int(_LAYER.fullmatch(node.inputs[3].name)[1])
            self._rewire_experts(node, layer)
            count += 1
        return count

    def _rewire_experts(self, node, layer: int) -> None:
        import onnx_ir as ir

        spec, cfg, scheme = self.spec, self.config, self.scheme
        e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
        new_inputs = []
        for index, (n, k) in ((3, (2 * i, h)), (4, (h, i))):
            name = node.inputs[index].name
            # int4: the packed bytes are those of an ONNX INT4 [E, N, K] tensor
            weight = self._initializer(f"{name}.quantized", lambda nm=name: self._experts(nm, 0),
                                       [e, n, k], scheme.expert_weight_type)
            scale_shape, scale_dtype = scheme.expert_scale(e, n, k, cfg)
            scale = self._initializer(f"{name}.scale", lambda nm=name: self._experts(nm, 1),
                                      scale_shape, scale_dtype)
            old = node.inputs[index]
            node.replace_input_with(index, weight)
            del self.graph.initializers[old.name]
            new_inputs.append(scale)
        if scheme.quantizes_activations:   # per-expert static scales: the body's act_scale_*
            calib = self.calibration[layer]
            moe_scale = scheme.activation_scale(calib.amax["moe_in"])
            down = [scheme.activation_scale(a) for a in calib.down_in_amax]
            new_inputs += [self._constant(f"layers.{layer}.moe.act_scale_gate_up",
                                          torch.full((e,), moe_scale)),
                           self._constant(f"layers.{layer}.moe.act_scale_down", torch.tensor(down))]
        base = len(node.inputs)
        node.resize_inputs(base + len(new_inputs))
        for offset, value in enumerate(new_inputs):
            node.replace_input_with(base + offset, value)
        node.attributes["quantization"] = ir.AttrString("quantization", scheme.moe.value)
        node.attributes["group_size"] = ir.AttrInt64("group_size", scheme.group_size(cfg))

    def attach_float_weights(self) -> None:
        """Every remaining empty initializer (norms, router, embeddings, lm_head), smoothed."""
        from mixbuild.tensors import lazy_tensor

        for name, value in self.graph.initializers.items():
            if value.const_value is None:
                value.const_value = lazy_tensor(lambda nm=name: self.weights(nm), self.act_dtype,
                                                value.shape, name)


def quantize_graph(onnx_model, ckpt, calibration, config: QuantConfig, act_dtype: torch.dtype,
                   store: QuantStore) -> dict:
    q = GraphQuantizer(onnx_model, ckpt, calibration, config, act_dtype, store)
    linears = q.quantize_linears()
    experts = q.quantize_experts()
    q.attach_float_weights()
    return {"linears": linears, "moe_nodes": experts}


