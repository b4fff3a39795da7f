"""mixbuild export: ONNX Runtime on the artifact computes what transformers computes.

These are the concat layout's tests (past in, present out: every position's logits, the names
Optimum and onnxruntime-genai use), so every export here names `layout="concat"`; the default
serving layout's graph, runtime and equivalence are tests/serving/test_serving_layout.py's, and
test_the_default_layout_is_serving runs the default end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from mixbuild.contract import DOMAIN
from mixbuild.errors import ArtifactError, UsageError
from mixbuild.exporter.export import export_checkpoint
from mixbuild.model.presets import PRESETS
from mixbuild.runtime.ort_runner import OrtRunner
from mixbuild.validate.hf_runner import HFRunner
from tests.helpers import compare_runners, left_padded_batch

TOL = 1e-4


@pytest.fixture(scope="session")
def artifacts(hf_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    return {name: export_checkpoint(path, root / name, layout="concat", progress=False)
            for name, path in hf_checkpoints.items() if name != "tiny"}


@pytest.fixture(scope="session")
def fixture_artifact(fixture_concat_artifact):
    return fixture_concat_artifact


@pytest.mark.parametrize("name", ["tiny-e4k1-mqa", "tiny-e8k3-mha"])
@pytest.mark.parametrize("lengths", [[5], [11, 3, 7]])
def test_ort_matches_transformers_on_odd_configs(hf_checkpoints, artifacts, name, lengths):
    ids, mask = left_padded_batch(PRESETS[name].vocab_size, lengths)
    worst, calls = compare_runners(HFRunner(hf_checkpoints[name]), OrtRunner(artifacts[name]),
                                   ids, mask, steps=16)
    assert calls == 17 and worst <= TOL


@pytest.mark.parametrize("lengths", [[1], [16], [40], [23, 9, 14]])
def test_ort_matches_transformers_on_trained_fixture(fixture_dir, fixture_artifact, lengths):
    spec = OrtRunner(fixture_artifact).spec
    ids, mask = left_padded_batch(spec.vocab_size, lengths, seed=len(lengths))
    worst, _ = compare_runners(HFRunner(fixture_dir), OrtRunner(fixture_artifact), ids, mask,
                               steps=16)
    assert worst <= TOL


def test_graph_contract(artifacts):
    path = artifacts["tiny-e4k1-mqa"]
    spec = PRESETS["tiny-e4k1-mqa"]
    onnx.checker.check_model(str(path / "model.onnx"), full_check=True)
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    custom = [n for n in model.graph.node if n.domain == DOMAIN]
    layers = spec.num_layers
    assert sorted(n.op_type for n in custom) == ["MoEExperts"] * layers + ["MoEGate"] * layers
    gate = next(n for n in custom if n.op_type == "MoEGate")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gate.attribute}
    assert attrs["top_k"] == 1 and attrs["normalize"] == 1 and attrs["plugin_namespace"] == b"mixbuild"
    assert {(f.domain, f.name) for f in model.functions} == {(DOMAIN, "MoEGate"), (DOMAIN, "MoEExperts")}
    names = [i.name for i in model.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    outs = [o.name for o in model.graph.output]
    assert outs[0] == "logits" and outs[-1] == f"present.{spec.num_layers - 1}.value"
    dims = [d.dim_param or d.dim_value for d in model.graph.input[3].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "past_seq", spec.head_dim]
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
               if t.name.endswith("w_gate_up"))


def test_manifest_and_hashes(artifacts):
    path = artifacts["tiny-e8k3-mha"]
    manifest = json.loads((path / "mixbuild.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["spec"]["top_k"] == 3
    assert set(manifest["files"]) >= {"model.onnx", "model.onnx.data"}
    assert manifest["inputs"][0] == {"name": "input_ids", "dtype": "int64"}
    assert len(manifest["files"]["model.onnx.data"]["sha256"]) == 64


def test_polygraphy_runs_the_artifact(artifacts):
    path = artifacts["tiny-e4k1-mqa"]
    spec = PRESETS["tiny-e4k1-mqa"]
    shapes = ["input_ids:[2,3]", "attention_mask:[2,5]", "position_ids:[2,3]"]
    shapes += [f"past_key_values.{i}.{kv}:[2,{spec.num_kv_heads},2,{spec.head_dim}]"
               for i in range(spec.num_layers) for kv in ("key", "value")]
    polygraphy = Path(sys.executable).parent / "polygraphy"
    out = subprocess.run([str(polygraphy), "run", str(path / "model.onnx"),
                          "--onnxrt", "--input-shapes", *shapes,
                          "--val-range", "input_ids:[0,90]", "attention_mask:[1,1]",
                          "position_ids:[0,4]"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "PASSED" in out.stdout + out.stderr


def test_bf16_and_fp16_export(bf16_checkpoint, tmp_path):
    fp16 = export_checkpoint(bf16_checkpoint, tmp_path / "fp16", dtype="fp16", layout="concat",
                             progress=False)
    bf16 = export_checkpoint(bf16_checkpoint, tmp_path / "bf16", dtype="bf16", layout="concat",
                             progress=False)
    size16 = PRESETS["tiny"].param_counts()["total"] * 2
    for path in (fp16, bf16):
        data = (path / "model.onnx.data").stat().st_size
        assert 0.99 * size16 < data <= size16  # 2 bytes per parameter (tiny norms stay inline)
    ids, mask = left_padded_batch(128, [6, 4])
    worst, _ = compare_runners(HFRunner(bf16_checkpoint), OrtRunner(fp16), ids, mask, steps=4)
    assert worst < 2e-2  # fp16 weights and activations against the fp32 reference


def test_existing_output_needs_overwrite(hf_checkpoints, artifacts):
    target = artifacts["tiny-e4k1-mqa"]
    before = (target / "mixbuild.json").read_text()
    with pytest.raises(UsageError, match="already exists"):
        export_checkpoint(hf_checkpoints["tiny-e4k1-mqa"], target, progress=False)
    assert (target / "mixbuild.json").read_text() == before


def test_failed_export_leaves_nothing(hf_checkpoints, tmp_path, monkeypatch):
    import mixbuild.exporter.export as ex

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "check_artifact_graph", broken)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(hf_checkpoints["tiny-e8k3-mha"], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_corrupted_data_is_refused(artifacts, tmp_path):
    import shutil

    path = tmp_path / "art"
    shutil.copytree(artifacts["tiny-e8k3-mha"], path)
    data = bytearray((path / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (path / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        OrtRunner(path)
    (path / "model.onnx.data").write_bytes(bytes(data[:-8]))
    with pytest.raises(ArtifactError, match="wrong size"):
        OrtRunner(path)


def test_moe_bodies_match_onnxruntime_contrib_moe():
    """The MoE function bodies against ONNX Runtime's own com.microsoft.MoE kernel."""
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper

    from mixbuild.exporter.functions import experts_function, gate_function

    t, h, i, e, k = 13, 32, 48, 6, 2
    rng = np.random.default_rng(1)
    x = rng.standard_normal((t, h)).astype(np.float32)
    logits = rng.standard_normal((t, e)).astype(np.float32)
    w1, w3 = (rng.standard_normal((e, i, h)).astype(np.float32) * 0.3 for _ in range(2))
    w2 = rng.standard_normal((e, h, i)).astype(np.float32) * 0.3
    gate_up = np.concatenate([w1, w3], axis=1)
    interleaved = np.stack([w1, w3], axis=2).reshape(e, 2 * i, h)  # ORT CPU's SwiGLU layout
    ours = [helper.make_node("MoEGate", ["r"], ["w", "ids"], domain=DOMAIN, top_k=k, normalize=1),
            helper.make_node("MoEExperts", ["x", "w", "ids", "gu", "w2"], ["ours"], domain=DOMAIN)]
    theirs = helper.make_node("MoE", ["x", "r", "fc1", "", "w2"], ["ort"], domain="com.microsoft",
                              k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                              activation_beta=0.0, swiglu_limit=1e30, normalize_routing_weights=1)
    feeds = {"x": x, "r": logits, "gu": gate_up, "fc1": interleaved, "w2": w2}
    inputs = [helper.make_tensor_value_info(n, TP.FLOAT, list(a.shape)) for n, a in feeds.items()]
    outputs = [helper.make_tensor_value_info(n, TP.FLOAT, [t, h]) for n in ("ours", "ort")]
    model = helper.make_model(
        helper.make_graph(ours + [theirs], "moe", inputs, outputs),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1),
                       helper.make_opsetid("com.microsoft", 1)],
        functions=[gate_function(), experts_function(e)])
    got, ref = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    assert np.abs(got - ref).max() < 1e-4
    assert np.abs(ref).max() > 0.1  # a real signal, not two zero tensors


def test_the_default_layout_is_serving(fixture_dir, tmp_path):
    """`mixbuild export` without --layout writes the serving layout, which validate runs (in a
    fresh process: the suite's own exports default to concat, tests/conftest.py)."""
    import subprocess
    import sys

    out = tmp_path / "default"
    done = subprocess.run([sys.executable, "-m", "mixbuild", "export", str(fixture_dir), "-o",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "mixbuild.json").read_text())
    assert manifest["layout"] == "serving" and not (out / "genai_config.json").exists()
    done = subprocess.run([sys.executable, "-m", "mixbuild", "validate", str(out), "--reference",
                           str(fixture_dir), "--max-sequences", "2", "--max-tokens", "64",
                           "--steps", "4", "--no-plot", "-o", str(tmp_path / "report")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
