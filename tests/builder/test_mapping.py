"""How MoE nodes reach TensorRT: the prepared graph per --moe mode, and the parser's choice.

The parser (onnx-tensorrt ModelImporter::parseNode) imports a node as a plugin when it has a
plugin_namespace attribute and a matching creator is registered, and otherwise imports a local
function of the same name. Plugin mode is proven by the built engines (test_build); here the
graph rewrites are checked and inline mode is shown on the real parser in this process.
"""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
from onnx import TensorProto

from mixbuild.builder import graph as G
from mixbuild.builder.options import MoEMode
from mixbuild.errors import ArtifactError


def load(artifact):
    return G.load_graph(artifact / "model.onnx")


def attrs(node) -> set[str]:
    return {a.name for a in node.attribute}


def test_plugin_mode_keeps_plugin_attrs_and_drops_the_bodies(artifacts):
    prepared = G.prepare(load(artifacts["fp16"]), MoEMode.PLUGIN)
    model = prepared.model
    assert prepared.moe_nodes == {"MoEGate": 3, "MoEExperts": 3}
    assert all({"plugin_namespace", "plugin_version"} <= attrs(n) for n in G.moe_nodes(model))
    assert [f.name for f in model.functions] == []
    assert prepared.rewrites == ["dropped 2 MoE function bodies (plugins replace them)"]
    ops = G.parser_ops(model, MoEMode.PLUGIN)
    assert not set(ops) & {"MoEGate", "MoEExperts", "NonZero", "ScatterND", "TopK"}


def test_inline_mode_expands_the_bodies_at_each_call_site(artifacts):
    prepared = G.prepare(load(artifacts["fp16"]), MoEMode.INLINE)
    model = prepared.model
    assert G.moe_nodes(model) == [] and list(model.functions) == []
    assert prepared.rewrites == ["stripped plugin attributes from 6 MoE nodes",
                                 "inlined the MoE function bodies at 6 call sites"]
    ops = G.parser_ops(model, MoEMode.INLINE)
    assert {"TopK", "ScatterElements", "CumSum", "GatherElements"} <= set(ops)
    assert "NonZero" not in ops                         # TensorRT-RTX has no NonZero
    names = [n.name for n in model.graph.node if n.name]
    assert len(names) == len(set(names))                # unique per call site


def test_int4_expert_weights_are_onnx_int4_and_need_no_retyping(artifacts):
    prepared = G.prepare(load(artifacts["int4"]), MoEMode.PLUGIN)
    experts = [t for t in prepared.model.graph.initializer if ".moe.w_" in t.name and
               t.name.endswith(".quantized")]
    assert len(experts) == 6 and all(t.data_type == TensorProto.INT4 for t in experts)
    assert not any("retyped" in r for r in prepared.rewrites)


def test_inline_mode_imports_the_function_bodies_even_with_plugins_registered(trt, artifacts):
    """With mixbuild's creators registered in this process, the stripped, inlined MoE still
    becomes ordinary layers: TopK per gate body, no plugin layer."""
    from mixbuild.plugins.trt_plugins import register_plugins

    register_plugins("tensorrt-rtx")
    artifact = artifacts["fp16"]
    prepared = G.prepare(load(artifact), MoEMode.INLINE)
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(prepared.serialize(), str(artifact / "model.onnx"))
    types = Counter(network.get_layer(i).type.name for i in range(network.num_layers))
    assert types["TOPK"] == 3 and types["SOFTMAX"] >= 3 and types["PLUGIN_V3"] == 0


def test_plugin_attribute_mismatch_is_refused(artifacts):
    model = load(artifacts["fp16"])
    node = G.moe_nodes(model)[0]
    for attr in node.attribute:
        if attr.name == "plugin_version":
            attr.CopyFrom(onnx.helper.make_attribute("plugin_version", "7"))
    with pytest.raises(ArtifactError, match="plugin_version = '7'"):
        G.prepare(model, MoEMode.PLUGIN)


def test_missing_plugin_attributes_are_added_and_missing_bodies_refused(artifacts):
    model = load(artifacts["fp16"])
    for node in G.moe_nodes(model):
        keep = [a for a in node.attribute if a.name not in G.PLUGIN_ATTRS]
        del node.attribute[:]
        node.attribute.extend(keep)
    del model.functions[:]
    with pytest.raises(ArtifactError, match="no ONNX function body for MoEExperts, MoEGate"):
        G.prepare(model, MoEMode.INLINE)
    prepared = G.prepare(model, MoEMode.PLUGIN)
    assert prepared.rewrites == ["added plugin attributes to 6 MoE nodes"]
