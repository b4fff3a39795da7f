"""Engine inspection: hashes verified, layers and plugins reported, and where the layers came
from. A TensorRT-RTX plan compiled ahead of time cannot be deserialized without CUDA, so on
this machine the layers are those captured from the network at build time."""

from __future__ import annotations

import shutil

import pytest

from mixbuild.builder.cli import is_engine_dir
from mixbuild.builder.inspect import inspect_engine, render_engine
from mixbuild.errors import ArtifactError


@pytest.fixture(scope="module")
def report(engines):
    return inspect_engine(engines["fp8"])


def test_report_describes_the_engine(report, engines):
    assert report["kind"] == "engine" and report["backend"] == "tensorrt-rtx"
    assert (report["precision"], report["compute_capability"], report["moe"]) == ("fp8", "8.9", "plugin")
    assert report["plan"]["verified"] is True
    assert [p["name"] for p in report["profiles"]] == ["prefill", "decode"]
    assert report["inputs"][0]["name"] == "input_ids" and report["outputs"][0]["name"] == "logits"
    assert is_engine_dir(engines["fp8"]) and not is_engine_dir(engines["fp8"].parent)


def test_layers_are_marked_and_their_source_named(report):
    layers = report["layers"]
    assert layers["source"] == "network"
    assert "no CUDA GPU" in layers["note"] and "captured at build time" in layers["note"]
    moe = [item for item in layers["items"] if item["moe_plugin"]]
    assert layers["moe_plugin_layers"] == len(moe) == 6
    assert {item["plugin"]["name"] for item in moe} == {"MoEGate", "MoEExperts"}
    assert layers["types"]["PLUGIN_V3"] == 6 and layers["types"]["QUANTIZE"] > 0


def test_render(report, capsys):
    render_engine(report)
    out = capsys.readouterr().out
    assert "mixbuild engine" in out and "MoE plugin layers: 6" in out
    assert "plugins the engine needs" in out and "prefill" in out and "decode" in out
    assert out.count("MoE plugin") >= 7


def test_corrupt_or_incomplete_engine_dirs(engines, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(engines["fp16"], copy)
    plan = copy / "engine.plan"
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF
    plan.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="engine plan is corrupt"):
        inspect_engine(copy)
    (copy / "engine.json").unlink()
    with pytest.raises(ArtifactError, match="not a mixbuild engine directory"):
        inspect_engine(copy)
    with pytest.raises(ArtifactError, match="engine directory not found"):
        inspect_engine(tmp_path / "missing")
