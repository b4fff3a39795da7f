"""Trace the reference model into an ONNX graph once, without real weights.

The model is built on the meta device, exported with the dynamo exporter (torch.export ->
onnx_ir) with the two MoE custom ops translated to `mixbuild::MoEGate` / `mixbuild::MoEExperts`
nodes, then cleaned up with onnxscript's optimizer. Initializers come out empty; the caller
attaches lazy tensors that stream from the checkpoint when the artifact is written.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch

from mixbuild.contract import (
    DOMAIN,
    DOMAIN_VERSION,
    EXPERTS_OP,
    GATE_OP,
    OPSET,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    SERVING_OPSET,
    DType,
    Layout,
    io_specs,
)
from mixbuild.exporter import schemas
from mixbuild.model.reference import model_class
from mixbuild.model.spec import MixtralSpec


def opset_for(layout: Layout) -> int:
    """The default-domain opset of an artifact: TensorScatter (the serving layout) needs 24."""
    return SERVING_OPSET if layout is Layout.SERVING else OPSET


def _translation_table():
    import onnxscript

    mb = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

    def moe_gate(router_logits, top_k: int, normalize: bool):
        return mb.MoEGate(router_logits, top_k=top_k, normalize=int(normalize),
                          plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
                          _num_outputs=2)

    def moe_experts(hidden, weights, expert_ids, w_gate_up, w_down):
        return mb.MoEExperts(hidden, weights, expert_ids, w_gate_up, w_down, activation="silu",
                             quantization="none", group_size=0,
                             plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)

    def kv_write(cache, update, write_index):
        return op.TensorScatter(cache, update, write_index, axis=2)

    def gqa_attention(q, k, v, mask):
        return op.Attention(q, k, v, mask)[0]

    op = onnxscript.values.Opset("", SERVING_OPSET)   # onnxscript ships opsets up to 23
    return {torch.ops.mixbuild.moe_gate.default: moe_gate,
            torch.ops.mixbuild.moe_experts.default: moe_experts,
            torch.ops.mixbuild.kv_write.default: kv_write,
            torch.ops.mixbuild.gqa_attention.default: gqa_attention}


def _serving_inputs(spec: MixtralSpec, dtype: torch.dtype):
    batch, seq, capacity = 2, 3, 8
    meta = {"device": "meta"}
    ids = torch.zeros(batch, seq, dtype=torch.long, **meta)
    positions = torch.zeros(batch, seq, dtype=torch.long, **meta)
    cache_lengths = torch.zeros(batch, dtype=torch.long, **meta)
    input_lengths = torch.ones(batch, dtype=torch.long, **meta)
    cache = [torch.zeros(batch, spec.num_kv_heads, capacity, spec.head_dim, dtype=dtype, **meta)
             for _ in range(2 * spec.num_layers)]
    b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
    c = torch.export.Dim("capacity")
    dynamic = ({0: b, 1: s}, {0: b, 1: s}, {0: b}, {0: b}, tuple({0: b, 2: c} for _ in cache))
    return (ids, positions, cache_lengths, input_lengths, *cache), dynamic


def _example_inputs(spec: MixtralSpec, dtype: torch.dtype, layout: Layout = Layout.CONCAT):
    if layout is Layout.SERVING:
        return _serving_inputs(spec, dtype)
    batch, seq, past = 2, 3, 5
    meta = {"device": "meta"}
    ids = torch.zeros(batch, seq, dtype=torch.long, **meta)
    positions = torch.zeros(batch, seq, dtype=torch.long, **meta)  # distinct: export follows aliasing
    mask = torch.ones(batch, past + seq, dtype=torch.long, **meta)
    kv = [torch.zeros(batch, spec.num_kv_heads, past, spec.head_dim, dtype=dtype, **meta)
          for _ in range(2 * spec.num_layers)]
    b, s, p = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past_seq")
    t = torch.export.Dim("total_seq")
    dynamic = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in kv))
    return (ids, mask, positions, *kv), dynamic


def trace(spec: MixtralSpec, dtype: torch.dtype, debug: bool = False,
          layout: Layout = Layout.CONCAT, all_logits: bool = False):
    """The ONNX graph (an onnx_ir.Model) of the reference model, with empty initializers."""
    import onnx_ir as ir
    import onnxscript.optimizer

    schemas.register()
    with torch.device("meta"):
        model = model_class(layout)(spec, debug=debug, all_logits=all_logits).to(dtype)
    args, dynamic = _example_inputs(spec, dtype, layout)
    with warnings.catch_warnings(), _quiet_logs():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic,
                                    custom_translation_table=_translation_table(),
                                    opset_version=opset_for(layout), optimize=False,
                                    verbose=False)
    onnx_model = program.model
    weights = {name for name, _ in model.named_parameters()}
    for name, value in onnx_model.graph.initializers.items():
        if name in weights:
            value.const_value = None   # meta tensors: nothing to fold; filled in when written
        elif getattr(getattr(value.const_value, "raw", None), "is_meta", False):
            raise RuntimeError(f"traced constant '{name}' has no data (a tensor made on the meta "
                               "device inside forward); build it from Python scalars instead")
    wanted = io_specs(spec, DType.parse(str(dtype)), debug, layout, all_logits)
    for values, tensors in zip((onnx_model.graph.inputs, onnx_model.graph.outputs), wanted):
        for value, tensor in zip(values, tensors, strict=True):
            value.name = tensor.name
            value.shape = ir.Shape(tensor.dims)
    with warnings.catch_warnings(), _quiet_logs():
        warnings.simplefilter("ignore")
        onnxscript.optimizer.optimize_ir(onnx_model)
    _check_moe_nodes(onnx_model, spec)
    return onnx_model


@contextlib.contextmanager
def _quiet_logs():
    """The optimizer logs a line per weight it cannot deduplicate (they are empty on purpose)."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_moe_nodes(onnx_model, spec: MixtralSpec) -> None:
    counts = {GATE_OP: 0, EXPERTS_OP: 0}
    for node in onnx_model.graph:
        if node.domain == DOMAIN:
            counts[node.op_type] += 1
    expected = {GATE_OP: spec.num_layers, EXPERTS_OP: spec.num_layers}
    if counts != expected:  # an internal invariant, not user input
        raise RuntimeError(f"traced graph has MoE nodes {counts}, expected {expected}")
