"""TensorRT plugin definitions, checked against the real tensorrt_rtx Python API where installed.

No engine is built and enqueue is not run (no GPU): the plugin methods TensorRT calls at network
and build time are called directly, and compute() (what enqueue runs on TensorRT's pointers) runs
on CPU tensors through the Triton interpreter.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mixbuild.contract import PLUGIN_NAMESPACE, PLUGIN_VERSION
from mixbuild.errors import MissingDependencyError, UsageError
from mixbuild.model.ops import gate_reference
from mixbuild.plugins import formats as F
from mixbuild.plugins import trt_fields as Fd
from mixbuild.plugins import trt_plugins as P
from tests.plugins.helpers import expert_weights, needs_triton

# -------------------------------------------------------------------- without TensorRT at all

def test_trt_module_names_the_extra(monkeypatch):
    real = importlib.import_module

    def missing(name, *args):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real(name, *args)
    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(MissingDependencyError) as info:
        P.trt_module("tensorrt")
    assert "pip install 'mixbuild[trt]'" in str(info.value) and "'tensorrt'" in str(info.value)
    with pytest.raises(UsageError, match=r"backend 'onnxruntime'\n  expected: tensorrt \| tensorrt-rtx\n"):
        P.trt_module("onnxruntime")


def test_attribute_parsing():
    gate = Fd.attrs_from_fields(Fd.GateAttrs, [("top_k", 2), ("normalize", 0), ("extra", 7)])
    assert gate == Fd.GateAttrs(top_k=2, normalize=False)
    experts = Fd.attrs_from_fields(Fd.ExpertsAttrs, [("quantization", "int4"), ("group_size", 64)])
    assert experts.quantization is F.QuantScheme.INT4 and experts.num_inputs == 7
    assert Fd.attrs_from_fields(Fd.ExpertsAttrs, []).num_inputs == 5
    assert Fd.attrs_from_fields(Fd.ExpertsAttrs, [("quantization", "fp8")]).num_inputs == 9
    assert Fd.attrs_to_items(experts) == [("activation", "silu"), ("quantization", "int4"),
                                         ("group_size", 64)]


@pytest.mark.parametrize("cls, items, match", [
    (Fd.GateAttrs, [("normalize", 1)], "top_k"),
    (Fd.GateAttrs, [("top_k", 0)], "positive"),
    (Fd.ExpertsAttrs, [("quantization", "int4")], "group_size"),
    (Fd.ExpertsAttrs, [("activation", "gelu")], "activation"),
    (Fd.ExpertsAttrs, [("quantization", "int8")], "scheme"),
])
def test_bad_attributes(cls, items, match):
    with pytest.raises(UsageError, match=match):
        Fd.attrs_from_fields(cls, items)


# --------------------------------------------------------------------------- with tensorrt_rtx

@pytest.fixture(scope="module")
def trt():
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("tensorrt_rtx is not installed (pip install tensorrt-rtx)")
    return P.trt_module("tensorrt-rtx")


@pytest.fixture(scope="module")
def creators(trt):
    return {c.name: c for c in P.register_plugins("tensorrt-rtx")}


def onnx_fields(trt, **attrs):
    """Fields as TensorRT's ONNX parser passes node attributes (INT32 ints, CHAR strings), and
    the arrays they point into (keep them alive)."""
    return Fd.make_fields(trt, list(attrs.items()))


def desc(trt, type_name, dims=(4, 8)):
    d = trt.DynamicPluginTensorDesc()
    d.desc.type = getattr(trt.DataType, type_name)
    d.desc.format = trt.TensorFormat.LINEAR
    d.desc.dims = trt.Dims(list(dims))
    d.max = trt.Dims(list(dims))
    return d


def test_creators_register_in_the_mixbuild_namespace(trt, creators):
    registry = trt.get_plugin_registry()
    for name in (Fd.GATE_PLUGIN, Fd.EXPERTS_PLUGIN):
        found = registry.get_creator(name, PLUGIN_VERSION, PLUGIN_NAMESPACE)
        assert found is creators[name]
        assert found.plugin_namespace == "mixbuild" and found.plugin_version == "1"
        assert len(found.field_names) >= 2
    assert P.register_plugins("tensorrt-rtx") == list(creators.values())     # idempotent


def test_gate_plugin_types_shapes_formats(trt, creators):
    fields, _keep = onnx_fields(trt, top_k=3, normalize=1)
    plugin = creators["MoEGate"].create_plugin("gate", fields, trt.TensorRTPhase.BUILD)
    assert plugin.attrs == Fd.GateAttrs(top_k=3, normalize=True)
    assert plugin.num_outputs == 2 and plugin.plugin_namespace == "mixbuild"
    assert plugin.get_output_data_types([trt.DataType.BF16]) == [trt.DataType.FLOAT,
                                                                 trt.DataType.INT32]
    constants = []

    class Builder:                     # records the constant; real exprs need a network context
        def constant(self, value):
            constants.append(value)

    shapes = plugin.get_output_shapes([trt.DimsExprs(2)], [], Builder())
    assert len(shapes) == 2 and all(len(s) == 2 for s in shapes) and constants == [3]
    io = [desc(trt, "HALF"), desc(trt, "FLOAT", (4, 3)), desc(trt, "INT32", (4, 3))]
    assert [plugin.supports_format_combination(i, io, 1) for i in range(3)] == [True] * 3
    io[2] = desc(trt, "INT64", (4, 3))
    assert not plugin.supports_format_combination(2, io, 1)
    assert not plugin.supports_format_combination(0, [desc(trt, "INT32")] + io[1:], 1)
    with pytest.raises(UsageError, match="top_k"):
        plugin.configure_plugin([desc(trt, "FLOAT", (4, 2))], [])


def test_fields_serialize_and_deserialize(trt, creators):
    fields, _keep = onnx_fields(trt, activation="silu", quantization="int4", group_size=128,
                                plugin_version="1")
    plugin = creators["MoEExperts"].create_plugin("experts", fields, trt.TensorRTPhase.BUILD)
    serialized = plugin.get_fields_to_serialize()
    values = {f.name: Fd.field_value(trt, f) for f in serialized}
    assert values == {"activation": "silu", "quantization": "int4", "group_size": 128}
    again = creators["MoEExperts"].create_plugin("experts", serialized, trt.TensorRTPhase.RUNTIME)
    assert again.attrs == plugin.attrs and again.phase == trt.TensorRTPhase.RUNTIME
    assert plugin.clone().attrs == plugin.attrs
    assert plugin.attach_to_context(None).attrs == plugin.attrs


@pytest.mark.parametrize("scheme, weight, scale, ok_weight", [
    ("none", "BF16", None, "BF16"), ("fp8", "FP8", "FLOAT", "UINT8"),
    ("int4", "UINT8", "HALF", "INT4")])
def test_experts_plugin_formats(trt, creators, scheme, weight, scale, ok_weight):
    fields, _keep = onnx_fields(trt, quantization=scheme, group_size=128 if scheme == "int4" else 0)
    plugin = creators["MoEExperts"].create_plugin("experts", fields, trt.TensorRTPhase.BUILD)
    n = plugin.attrs.num_inputs
    io = [desc(trt, "BF16"), desc(trt, "FLOAT"), desc(trt, "INT32"), desc(trt, weight),
          desc(trt, ok_weight)] + [desc(trt, scale) for _ in range(n - 5)] + [desc(trt, "BF16")]
    assert [plugin.supports_format_combination(i, io, n) for i in range(n + 1)] == [True] * (n + 1)
    assert not plugin.supports_format_combination(0, io, n + 1)             # wrong input count
    wrong = list(io)
    wrong[n] = desc(trt, "HALF")                                            # out != hidden type
    assert not plugin.supports_format_combination(n, wrong, n)
    wrong[3] = desc(trt, "FLOAT" if scheme != "none" else "HALF")
    assert not plugin.supports_format_combination(3, wrong, n)
    assert plugin.get_output_data_types([trt.DataType.BF16] * n) == [trt.DataType.BF16]
    assert len(plugin.get_output_shapes([trt.DimsExprs(2)] * n, [], None)[0]) == 2
    with pytest.raises(UsageError, match="number of inputs"):
        plugin.configure_plugin(io[:n - 1], io[n:])


def test_experts_workspace_size_uses_the_profile_maximum(trt, creators):
    fields, _keep = onnx_fields(trt, quantization="none")
    plugin = creators["MoEExperts"].create_plugin("experts", fields, trt.TensorRTPhase.BUILD)
    E, H, I, T, k = 8, 64, 96, 512, 2
    io = [desc(trt, "HALF", (T, H)), desc(trt, "FLOAT", (T, k)), desc(trt, "INT32", (T, k)),
          desc(trt, "HALF", (E, 2 * I, H)), desc(trt, "HALF", (E, H, I))]
    for d in io[:3]:                   # the build-time dims are 1 token; the profile max is T
        d.desc.dims = trt.Dims([1, *list(d.max)[1:]])
    # S = T*k = 1024 slots; padded capacity at M=256: 1024 + 8*255 = 3064 -> 3072; every
    # buffer rounded up to 256 bytes: sorted slots 3072*4 = 12288, block experts 3072/16*4 = 768,
    # padded count 4 -> 256, intermediate 1024*96*2 = 196608, per-slot out 1024*64*2 = 131072
    assert plugin.get_workspace_size(io, [desc(trt, "HALF", (T, H))]) == \
        12288 + 768 + 256 + 196608 + 131072


@needs_triton
def test_compute_runs_the_kernels_with_the_node_input_order(trt, creators, gen):
    fields, _keep = onnx_fields(trt, top_k=2, normalize=1)
    gate = creators["MoEGate"].create_plugin("gate", fields, trt.TensorRTPhase.RUNTIME)
    logits = torch.randn(5, 4, generator=gen)
    weights, ids = torch.empty(5, 2), torch.empty(5, 2, dtype=torch.int32)
    gate.compute([logits], [weights, ids])
    weights_ref, ids_ref = gate_reference(logits, 2, True)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(weights, weights_ref, rtol=1e-6, atol=1e-7)

    fields, _keep = onnx_fields(trt, quantization="int4", group_size=16)
    experts = creators["MoEExperts"].create_plugin("experts", fields, trt.TensorRTPhase.RUNTIME)
    w_gate_up, w_down = expert_weights(4, 32, 48, gen)
    p1, s1 = F.quantize_int4(w_gate_up, 16)
    p2, s2 = F.quantize_int4(w_down, 16)
    x = torch.randn(5, 32, generator=gen)
    inputs = [x, weights, ids, p1, p2, s1, s2]
    out = torch.empty(5, 32)
    workspace = torch.zeros(experts.workspace_bytes(inputs), dtype=torch.uint8)
    experts.compute(inputs, [out], workspace)
    want = F.experts_reference_quant(x, weights, ids, p1, p2, scheme="int4", w_gate_up_scale=s1,
                                     w_down_scale=s2, group_size=16)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
