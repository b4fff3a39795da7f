"""Engines built with TensorRT-RTX on the CPU (ahead of time for SM 8.9), checked on what the
builder reports: I/O, profiles, layers and plugins, hashes, provenance, build times.

Running an engine needs a GPU (not available here); see test_inspect for what is verified
instead of deserializing.
"""

from __future__ import annotations

from collections import Counter

import pytest

from mixbuild.contract import MOE_OPS, input_names, output_names
from mixbuild.exporter.manifest import sha256_file
from tests.builder.conftest import LIMITS, PRECISIONS, TARGET, manifest

DTYPES = {"fp16": "float16"}


@pytest.fixture(scope="module")
def spec(artifacts):
    from mixbuild.exporter.artifact import Artifact

    return Artifact.open(artifacts["fp16"], verify_hashes=False).spec


@pytest.mark.parametrize("precision", PRECISIONS)
def test_engine_identity_and_provenance(trt, engines, artifacts, precision):
    m = manifest(engines[precision])
    assert m["kind"] == "engine" and m["backend"] == "tensorrt-rtx"
    assert m["tensorrt"] == {"module": "tensorrt_rtx",
                             "version": trt.__version__,
                             "onnx_parser_version": trt.get_nv_onnx_parser_version()}
    assert (m["compute_capability"], m["moe"], m["precision"]) == (TARGET, "plugin", precision)
    assert m["limits"] == LIMITS and m["spec"]["num_layers"] == 3
    plan = engines[precision] / "engine.plan"
    assert m["plan"] == {"file": "engine.plan", "sha256": sha256_file(plan),
                         "bytes": plan.stat().st_size} and m["plan"]["bytes"] > 100_000
    assert m["source"]["manifest_sha256"] == sha256_file(artifacts[precision] / "mixbuild.json")
    assert m["source"]["precision"] == precision
    assert m["builder"]["strongly_typed"] is True
    assert m["builder"]["optimization_level"] == 0
    assert m["builder"]["profiling_verbosity"] == "DETAILED"
    build = m["build"]
    assert 0 < build["build_s"] < build["wall_s"] and build["parse_s"] < build["build_s"]
    print(f"\n{precision}: built in {build['wall_s']:.2f} s (builder {build['build_s']:.2f} s)")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_engine_io_matches_the_onnx_contract(engines, spec, precision):
    m = manifest(engines[precision])
    inputs = {t["name"]: t for t in m["inputs"]}
    outputs = {t["name"]: t for t in m["outputs"]}
    assert list(inputs) == input_names(spec.num_layers) and list(outputs) == output_names(spec.num_layers)
    kv, h, d = spec.num_kv_heads, spec.head_dim, spec.vocab_size
    for name in ("input_ids", "position_ids"):
        assert inputs[name] == {"name": name, "dtype": "int64", "shape": [-1, -1],
                                "dims": ["batch", "seq"]}
    assert inputs["attention_mask"]["dims"] == ["batch", "total_seq"]
    past = inputs["past_key_values.0.key"]
    assert (past["dtype"], past["shape"], past["dims"]) == ("float16", [-1, kv, -1, h],
                                                           ["batch", kv, "past_seq", h])
    assert outputs["logits"] == {"name": "logits", "dtype": "float32", "shape": [-1, -1, d],
                                 "dims": ["batch", "seq", d]}
    present = outputs[f"present.{spec.num_layers - 1}.value"]
    assert (present["dtype"], present["dims"]) == ("float16", ["batch", kv, "total_seq", h])


def test_profiles_cover_prefill_and_decode(engines):
    m = manifest(engines["fp16"])
    prefill, decode = m["profiles"]
    c, s, b = LIMITS["max_context"], LIMITS["max_step_tokens"], LIMITS["max_batch"]
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    assert prefill["dims"] == {"batch": [1, 1, b], "seq": [1, s, s], "past_seq": [0, 0, c - s],
                               "total_seq": [1, s, c]}
    assert decode["dims"] == {"batch": [1, b, b], "seq": [1, 1, 1],
                              "past_seq": [1, c // 2, c - 1], "total_seq": [2, c // 2 + 1, c]}
    assert decode["shapes"]["past_key_values.0.key"]["max"][2] == c - 1
    assert prefill["shapes"]["attention_mask"] == {"min": [1, 1], "opt": [1, s], "max": [b, c]}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_plugin_mode_maps_every_moe_node_to_a_mixbuild_plugin(engines, spec, precision):
    m = manifest(engines[precision])
    layers = m["layers"]
    assert layers["source"] == "network" and layers["count"] == len(layers["items"]) > 100
    plugin_layers = [item for item in layers["items"] if "plugin" in item]
    assert {item["type"] for item in plugin_layers} == {"PLUGIN_V3"}
    assert Counter(item["plugin"]["name"] for item in plugin_layers) == \
        dict.fromkeys(MOE_OPS, spec.num_layers)
    assert m["plugins"] == [{"name": op, "namespace": "mixbuild", "version": "1",
                             "layers": spec.num_layers} for op in sorted(MOE_OPS)]
    types = Counter(item["type"] for item in layers["items"])
    assert "TOPK" not in types and "NON_ZERO" not in types   # no function body was inlined


def test_precision_comes_from_the_artifact(engines, spec):
    """Q/DQ layers exist exactly where the artifact has them: builder flags set no precision."""
    types = {p: Counter(i["type"] for i in manifest(engines[p])["layers"]["items"])
             for p in PRECISIONS}
    assert types["fp16"]["QUANTIZE"] == types["fp16"]["DEQUANTIZE"] == 0
    assert types["int4"]["QUANTIZE"] == 0 and types["int4"]["DEQUANTIZE"] > 0
    assert types["fp8"]["QUANTIZE"] > 0 and types["fp8"]["DEQUANTIZE"] > 0
    rewrites = {p: manifest(engines[p])["builder"]["graph_rewrites"] for p in PRECISIONS}
    assert not any("retyped" in r for p in PRECISIONS for r in rewrites[p])  # int4 is ONNX INT4
    assert all(any("dropped 2 MoE function bodies" in r for r in rewrites[p]) for p in PRECISIONS)


def test_engine_command_summary_and_ignored_timing_cache(engines):
    root = engines["fp16"].parent
    summary = (root / "fp16-command.txt").read_text()
    assert summary.startswith(f"built {engines['fp16']} (tensorrt-rtx ")
    assert "plugins: MoEExperts x3, MoEGate x3" in summary and "SM 8.9, fp16" in summary
    assert "--timing-cache ignored" in summary
    cache = manifest(engines["fp16"])["builder"]["timing_cache"]
    assert cache["used"] is False and "no-ops" in cache["reason"]
    assert not (root / "timing.cache").exists()      # neither read nor written


def test_engine_dir_holds_only_the_plan_and_manifest(engines):
    for path in engines.values():
        assert sorted(p.name for p in path.iterdir()) == ["engine.json", "engine.plan"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_inline_mode_builds_the_function_bodies_without_plugins(inline_engines, spec, precision):
    m = manifest(inline_engines[precision])
    assert m["moe"] == "inline" and m["plugins"] == []
    types = Counter(item["type"] for item in m["layers"]["items"])
    assert types["PLUGIN_V3"] == 0 and not any("plugin" in item for item in m["layers"]["items"])
    assert types["TOPK"] == spec.num_layers                       # one gate body per layer
    assert types["SCATTER"] == spec.num_layers                # one routing sort per layer
    assert types["MATRIX_MULTIPLY"] >= 2 * spec.num_layers * spec.num_experts  # expert GEMMs
    assert any("inlined the MoE function bodies" in r for r in m["builder"]["graph_rewrites"])
    assert m["build"]["wall_s"] > 0
