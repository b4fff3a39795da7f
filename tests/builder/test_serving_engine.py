"""TensorRT-RTX engines of serving-layout artifacts: the cache update and the attention become
TensorRT's own KV-cache-update and attention layers, the capacity is fixed in the engine, and
both MoE modes build at every precision."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.builder.conftest import LIMITS, PRECISIONS, TARGET, engine_artifacts, manifest


@pytest.fixture(scope="module")
def serving_artifacts(fixture_export):
    return engine_artifacts(fixture_export)     # the default layout: serving


@pytest.mark.parametrize("moe", ["plugin", "inline"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_serving_engines_use_tensorrt_kv_cache_and_attention_layers(trt, serving_artifacts,
                                                                    tmp_path, precision, moe):
    from mixbuild.builder.build import build_engine

    out = build_engine(serving_artifacts[precision], tmp_path / "engine", backend="tensorrt-rtx",
                       compute_capability=TARGET, moe=moe, opt_level=0, progress=False, **LIMITS)
    m = manifest(out)
    layers = 3
    types = Counter(item["type"] for item in m["layers"]["items"])
    assert types["KV_CACHE_UPDATE"] == 2 * layers          # TensorScatter -> IKVCacheUpdateLayer
    assert types["ATTENTION_INPUT"] == types["ATTENTION_OUTPUT"] == layers   # -> IAttention
    assert m["layout"] == "serving" and m["cache_capacity"] == LIMITS["max_context"]
    cache = next(t for t in m["inputs"] if t["name"] == "cache.0.key")
    assert cache["shape"][2] == LIMITS["max_context"]      # fixed, as the update layer needs
    assert any("cache capacity fixed" in r for r in m["builder"]["graph_rewrites"])
    assert {p["name"]: sorted(p["dims"]) for p in m["profiles"]} == {
        "prefill": ["batch", "capacity", "seq"], "decode": ["batch", "capacity", "seq"]}
    assert (types["PLUGIN_V3"] == 2 * layers) == (moe == "plugin")


def test_a_quantized_lm_head_reaches_tensorrt_as_a_dequantize_layer(trt, fixture_export, tmp_path):
    """`--lm-head int8` on an int4 artifact: the engine builds, and the head's blocked INT8
    DequantizeLinear is a TensorRT Dequantize layer (one more than the attention linears')."""
    from mixbuild.builder.build import build_engine
    from tests.conftest import small_quant

    artifact = fixture_export(dtype="fp16", quant=small_quant("int4", int4_method="rtn", lm_head="int8"))
    out = build_engine(artifact, tmp_path / "engine", backend="tensorrt-rtx",
                       compute_capability=TARGET, moe="plugin", opt_level=0, progress=False, **LIMITS)
    items = manifest(out)["layers"]["items"]
    assert Counter(item["type"] for item in items)["DEQUANTIZE"] == 4 * 3 + 1
    assert any(item["name"] == "lm_head.weight.quantized" for item in items)
