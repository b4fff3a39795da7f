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


def test_inline_mode_strips_plugin_attrs_and_keeps_the_bodies(artifacts):
    prepared = G.prepare(load(artifacts["fp16"]), MoEMode.INLINE)
    model = prepared.model
    assert not any({"plugin_namespace", "plugin_version"} & attrs(n) for n in G.moe_nodes(model))
    assert sorted(f.name for f in model.functions) == ["MoEExperts", "MoEGate"]
    assert prepared.rewrites == ["stripped plugin attributes from 6 MoE nodes"]
    ops = G.parser_ops(model, MoEMode.INLINE)
    assert ops["NonZero"] == ops["ScatterND"] == "the MoEExperts function body"
    assert ops["TopK"] == "the MoEGate function body"


def test_int4_weights_are_retyped_in_place_without_touching_the_data(artifacts):
    before = {t.name: t for t in load(artifacts["int4"]).graph.initializer}
    prepared = G.prepare(load(artifacts["int4"]), MoEMode.PLUGIN)
    after = {t.name: t for t in prepared.model.graph.initializer}
    retyped = [n for n, t in after.items() if t.data_type != before[n].data_type]
    assert len(retyped) == 6 and all(".moe.w_" in n for n in retyped)
    for name in retyped:
        old, new = before[name], after[name]
        assert (old.data_type, new.data_type) == (TensorProto.UINT8, TensorProto.INT4)
        assert list(new.dims) == [*old.dims[:-1], 2 * old.dims[-1]]
        assert list(new.external_data) == list(old.external_data)      # same file, offset, length
    linear = [n for n, t in after.items() if t.data_type == TensorProto.INT4 and n not in retyped]
    assert linear and all(after[n] == before[n] for n in linear)      # blocked-DQ weights as is


def test_inline_mode_imports_the_function_bodies_even_with_plugins_registered(trt, artifacts):
    """With mixbuild's creators registered in this process, the stripped nodes still go to their
    local functions: the gate body becomes TopK/Softmax layers, no plugin layer appears, and
    the experts body stops at NonZero (TensorRT-RTX's gap, refused by preflight)."""
    from mixbuild.plugins.trt_plugins import register_plugins

    register_plugins("trt-rtx")
    artifact = artifacts["fp16"]
    prepared = G.prepare(load(artifact), MoEMode.INLINE)
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert not parser.parse(prepared.serialize(), str(artifact / "model.onnx"))
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    assert [e.node_operator() for e in errors] == ["NonZero"]
    assert "NonZero plugin creator version 1 was not found" in errors[0].desc()
    types = Counter(network.get_layer(i).type.name for i in range(network.num_layers))
    assert types["TOPK"] == 1 and types["SOFTMAX"] >= 2 and types["PLUGIN_V3"] == 0


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
