"""Opening an artifact or an engine checks its manifest against what it describes: an edited,
incomplete or mistyped mixbuild.json / engine.json is refused with one ArtifactError naming the
field (expected: what the graph or plan holds; found: what the manifest says), and every
command that opens it (inspect, run, engine) exits 2 with that message, never a traceback."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mixbuild import cli
from mixbuild.errors import ArtifactError, ConfigError
from mixbuild.exporter.artifact import Artifact
from mixbuild.model.presets import PRESETS
from mixbuild.model.spec import MixtralSpec

ENGINE_ARGS = ("--backend", "tensorrt-rtx", "--cc", "8.9", "--max-batch", "1",
               "--max-step-tokens", "16", "--max-context", "64", "--opt-level", "0")


def run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


class Replace:
    """Returned by an edit: write this value instead of the edited manifest."""

    def __init__(self, value) -> None:
        self.value = value


def edit_manifest(src: Path, dst: Path, edit, name: str = "mixbuild.json") -> Path:
    """A copy of the directory `src` whose manifest went through `edit(manifest)` (in place;
    or a Replace it returns)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / name).read_text())
    returned = edit(manifest)
    if isinstance(returned, Replace):
        manifest = returned.value
    (dst / name).write_text(json.dumps(manifest, indent=2))
    return dst


def assert_refused(result, *lines: str) -> None:
    """Exit 2, one "error:" message holding every line, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.output.startswith("error: "), result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    for line in lines:
        assert line in result.output, f"{line!r} not in:\n{result.output}"


@pytest.fixture(scope="module")
def quantized(fixture_export) -> dict[str, Path]:
    """The trained fixture as int4 (RTN, group 128) and fp8 fp16 artifacts of the default
    layout, calibrated on as little as the quantizer allows: only the graphs and manifests
    matter here (the builder's serving artifacts, shared)."""
    from tests.builder.conftest import engine_artifacts

    artifacts = engine_artifacts(fixture_export)
    return {name: artifacts[name] for name in ("int4", "fp8")}


# ------------------------------------------------------------------ edited values (the graph)

def _set(*path_value):
    """An edit that sets manifest[k1][k2]... = value for each (keys, value) pair."""
    def edit(manifest):
        for keys, value in path_value:
            target = manifest
            for key in keys[:-1]:
                target = target[key]
            target[keys[-1]] = value
    return edit


INT4_QUANT = {"precision": "int4", "int4_method": "rtn", "group_size": 128, "fp8_per_channel": True,
              "calib_file": None, "calib_tokens": 64, "calib_seq_len": 32, "rounding": "nearest"}

# (edit, field named, expected line, found line) on the fp32 artifact of the default (serving)
# layout
FLOAT_EDITS = {
    "precision fp32 -> int4": (
        _set((["precision"], "int4"), (["quantization"], INT4_QUANT)), "precision",
        "expected: fp32 (model.onnx has no FLOAT8E4M3FN or INT4 initializers", 'found:    "int4"'),
    "precision fp32 -> fp8": (
        _set((["precision"], "fp8"), (["quantization"], {**INT4_QUANT, "precision": "fp8"})),
        "precision", "expected: fp32", 'found:    "fp8"'),
    "top_k 2 -> 1": (_set((["spec", "top_k"], 1)), "spec.top_k",
                     "expected: 2 (the top_k attribute of model.onnx's MoEGate node of layer 0)",
                     "found:    1"),
    "vocab_size 2048 -> 4096": (_set((["spec", "vocab_size"], 4096)), "spec.vocab_size",
                                "expected: 2048 (the last dim of model.onnx's logits output)",
                                "found:    4096"),
    "dtype float32 -> float16": (_set((["dtype"], "float16"), (["precision"], "fp16")), "dtype",
                                 "expected: float32 (the element type of model.onnx's "
                                 "cache.0.key)", 'found:    "float16"'),
    "dtype alone": (_set((["dtype"], "bfloat16")), "dtype", "expected: float32",
                    'found:    "bfloat16"'),
    "num_layers 3 -> 2": (_set((["spec", "num_layers"], 2)), "spec.num_layers",
                          "expected: 3 (model.onnx has 3 MoEGate and 3 MoEExperts nodes",
                          "found:    2"),
    "num_experts 8 -> 4": (_set((["spec", "num_experts"], 4)), "spec.num_experts",
                           "expected: 8 (model.onnx's MoEExperts weights of layer 0",
                           "found:    4"),
    "hidden_size": (_set((["spec", "hidden_size"], 64), (["spec", "num_heads"], 2)),
                    "spec.hidden_size", "expected: 128", "found:    64"),
    "intermediate_size": (_set((["spec", "intermediate_size"], 128)), "spec.intermediate_size",
                          "expected: 256", "found:    128"),
    "num_kv_heads": (_set((["spec", "num_kv_heads"], 4)), "spec.num_kv_heads",
                     "expected: 2 (dim 1 of model.onnx's cache.0.key", "found:    4"),
    "head_dim": (_set((["spec", "head_dim"], 16)), "spec.head_dim", "expected: 32", "found:    16"),
    "debug_outputs": (_set((["debug_outputs"], True)), "debug_outputs",
                      "expected: false (model.onnx has no debug.* outputs)", "found:    true"),
    "quantization on a float artifact": (_set((["quantization"], INT4_QUANT)), "quantization",
                                         "expected: null (a fp32 artifact is not quantized)",
                                         'found:    {"precision": "int4"'),
    "an input renamed": (_set((["inputs", 0, "name"], "tokens")), "inputs[0]",
                         "expected: {'name': 'input_ids', 'dtype': 'int64'}",
                         'found:    {"name": "tokens", "dtype": "int64"}'),
    "an input's dtype": (_set((["inputs", 4, "dtype"], "float16")), "inputs[4]",
                         "'name': 'cache.0.key', 'dtype': 'float32'",
                         '"dtype": "float16"'),
    "outputs reordered": (lambda m: m.update(outputs=[m["outputs"][1], m["outputs"][0],
                                                      *m["outputs"][2:]]), "outputs[0]",
                          "expected: {'name': 'logits', 'dtype': 'float32'}",
                          '"name": "updated_cache.0.key"'),
    "an output dropped": (lambda m: m["outputs"].pop(), "outputs", "expected: 7 entries",
                          "found:    \"logits, updated_cache.0.key"),
    "opset": (_set((["opset", ""], 20)), "opset.ai.onnx", "expected: 24", "found:    20"),
    "the data file unlisted": (lambda m: m["files"].pop("model.onnx.data"), "files",
                               "it reads model.onnx.data", "found:    ["),
}


@pytest.mark.parametrize("case", list(FLOAT_EDITS))
def test_an_edited_float_manifest_is_refused_by_inspect(fixture_fp32_artifact, tmp_path, case):
    edit, name, expected, found = FLOAT_EDITS[case]
    artifact = edit_manifest(fixture_fp32_artifact, tmp_path / "artifact", edit)
    before = digest(artifact)
    with pytest.raises(ArtifactError) as err:
        Artifact.open(artifact)
    assert f"field '{name}' does not match the artifact" in str(err.value)
    assert_refused(run("inspect", artifact), f"{artifact / 'mixbuild.json'}: field '{name}' "
                   "does not match the artifact", expected, found, "fix:      the manifest was edited")
    assert digest(artifact) == before


ENGINE_AND_RUN = ["precision fp32 -> int4", "top_k 2 -> 1", "vocab_size 2048 -> 4096",
                  "dtype float32 -> float16", "num_layers 3 -> 2"]


@pytest.mark.parametrize("case", ENGINE_AND_RUN)
def test_engine_and_run_refuse_an_edited_artifact(fixture_fp32_artifact, tmp_path, case):
    """Before this check `mixbuild engine` built and `mixbuild run` generated from these."""
    edit, name, expected, found = FLOAT_EDITS[case]
    artifact = edit_manifest(fixture_fp32_artifact, tmp_path / "artifact", edit)
    before = digest(artifact)
    out = tmp_path / "engine"
    assert_refused(run("engine", artifact, "-o", out, *ENGINE_ARGS), f"field '{name}'", expected,
                   found)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
    assert_refused(run("run", artifact, "--prompt", "def", "--max-new-tokens", "2"),
                   f"field '{name}'", expected, found)
    assert digest(artifact) == before


QUANT_EDITS = {
    ("int4", "precision int4 -> fp8"): (
        _set((["precision"], "fp8"), (["quantization", "precision"], "fp8")), "precision",
        "expected: int4 (model.onnx has INT4 initializers", 'found:    "fp8"'),
    ("int4", "precision int4 -> fp16"): (
        _set((["precision"], "fp16"), (["quantization"], None)), "precision",
        "expected: int4", 'found:    "fp16"'),
    ("int4", "group_size 128 -> 64"): (
        _set((["quantization", "group_size"], 64)), "quantization.group_size",
        "expected: 128 (the group_size attribute of model.onnx's MoEExperts node of layer 0)",
        "found:    64"),
    ("int4", "group_size a string"): (
        _set((["quantization", "group_size"], "128")), "quantization.group_size",
        "expected: the int4 group size, a positive integer", 'found:    "128"'),
    ("int4", "quantization dropped"): (
        _set((["quantization"], None)), "quantization",
        "expected: the quantization settings of the int4 artifact", "found:    null"),
    ("fp8", "precision fp8 -> int4"): (
        _set((["precision"], "int4"), (["quantization", "precision"], "int4")), "precision",
        "expected: fp8 (model.onnx has FLOAT8E4M3FN initializers and 12 QuantizeLinear nodes)",
        'found:    "int4"'),
    ("fp8", "precision fp8 -> fp16"): (
        _set((["precision"], "fp16"), (["quantization"], None)), "precision",
        "expected: fp8", 'found:    "fp16"'),
    ("fp8", "quantization.precision"): (
        _set((["quantization", "precision"], "int4")), "quantization.precision",
        "expected: fp8", 'found:    "int4"'),
}


@pytest.mark.parametrize("key", list(QUANT_EDITS), ids=[f"{k[0]}: {k[1]}" for k in QUANT_EDITS])
def test_an_edited_quantized_manifest_is_refused(quantized, tmp_path, key):
    edit, name, expected, found = QUANT_EDITS[key]
    artifact = edit_manifest(quantized[key[0]], tmp_path / "artifact", edit)
    before = digest(artifact)
    assert_refused(run("inspect", artifact), f"field '{name}' does not match the artifact",
                   expected, found)
    out = tmp_path / "engine"
    assert_refused(run("engine", artifact, "-o", out, *ENGINE_ARGS), f"field '{name}'")
    assert not out.exists()
    assert digest(artifact) == before


def test_unedited_artifacts_open(fixture_fp32_artifact, quantized):
    for path in (fixture_fp32_artifact, *quantized.values()):
        artifact = Artifact.open(path)
        assert artifact.spec.num_layers == 3
        result = run("inspect", path)
        assert result.exit_code == 0, result.output


# ------------------------------------------------------------- missing keys and wrong types

REQUIRED = ["kind", "producer", "spec", "precision", "dtype", "opset", "debug_outputs", "source",
            "quantization", "inputs", "outputs", "files"]


@pytest.mark.parametrize("key", REQUIRED)
def test_a_missing_key_is_named(fixture_fp32_artifact, tmp_path, key):
    artifact = edit_manifest(fixture_fp32_artifact, tmp_path / "artifact", lambda m: m.pop(key))
    before = digest(artifact)
    with pytest.raises(ArtifactError, match=f"required field '{key}' is missing"):
        Artifact.open(artifact)
    assert_refused(run("inspect", artifact), f"required field '{key}' is missing", "fix:")
    assert digest(artifact) == before


WRONG_TYPES = {
    "files": ([], "field 'files' has the wrong type", "expected: object", "found:    array []"),
    "spec": ("tiny", "field 'spec' has the wrong type", "expected: object", 'found:    string "tiny"'),
    "precision": (3, "field 'precision' has the wrong type", "expected: string", "found:    integer 3"),
    "dtype": ("float64", "field 'dtype' has an unknown value", "expected: float32 | float16 | bfloat16",
              'found:    "float64"'),
    "inputs": ({}, "field 'inputs' has the wrong type", "expected: array", "found:    object {}"),
    "outputs": (["logits"], "field 'outputs[0]' has the wrong type", "expected: an object {name, dtype}",
                'found:    "logits"'),
    "debug_outputs": ("no", "field 'debug_outputs' has the wrong type", "expected: boolean",
                      'found:    string "no"'),
    "opset": ([21], "field 'opset' has the wrong type", "expected: object", "found:    array [21]"),
    "quantization": (0, "field 'quantization' has the wrong type", "expected: object or null",
                     "found:    integer 0"),
    "kind": ("engine", "field 'kind' has an unknown value", "expected: artifact", 'found:    "engine"'),
    "layout": ("paged", "field 'layout' has an unknown value", "expected: concat | serving",
               'found:    "paged"'),
    "logits": ("some", "field 'logits' has an unknown value", "expected: all | last",
               'found:    "some"'),
    "format_version": (True, "unsupported manifest format", "expected: format_version 1",
                       "found:    True"),
}


@pytest.mark.parametrize("key", list(WRONG_TYPES))
def test_a_wrong_type_is_named(fixture_fp32_artifact, tmp_path, key):
    value, what, expected, found = WRONG_TYPES[key]
    artifact = edit_manifest(fixture_fp32_artifact, tmp_path / "artifact", _set(([key], value)))
    before = digest(artifact)
    with pytest.raises(ArtifactError):
        Artifact.open(artifact)
    assert_refused(run("inspect", artifact), what, expected, found)
    assert digest(artifact) == before


NESTED = {
    "a file's size as a string": (_set((["files", "model.onnx", "bytes"], "12")),
                                  "field 'files[\"model.onnx\"].bytes' has the wrong type"),
    "a file's entry a string": (_set((["files", "model.onnx"], "abc")),
                                "field 'files[\"model.onnx\"]' has the wrong type"),
    "a short sha256": (_set((["files", "model.onnx", "sha256"], "abc")),
                       "field 'files[\"model.onnx\"].sha256' is not a sha256 digest"),
    "a path outside the artifact": (lambda m: m["files"].update({"../../etc/passwd": m["files"][
        "model.onnx"]}), "field 'files[\"../../etc/passwd\"]' is not a file name of the artifact"),
    "model.onnx unlisted": (lambda m: m["files"].pop("model.onnx"),
                            "field 'files' does not list model.onnx"),
    "an input without a name": (lambda m: m["inputs"][1].pop("name"),
                                "required field 'inputs[1].name' is missing"),
    "an opset version a string": (_set((["opset", "mixbuild"], "1")),
                                  "field 'opset.mixbuild' has the wrong type"),
    "spec top_k missing": (lambda m: m["spec"].pop("top_k"), "spec: required field 'top_k' is missing"),
    "spec top_k a float": (_set((["spec", "top_k"], 2.0)), "spec: field 'top_k' must be a positive integer"),
    "spec rope_theta a string": (_set((["spec", "rope_theta"], "1e6")),
                                 "spec: field 'rope_theta' must be a number"),
    "spec sliding_window a string": (_set((["spec", "sliding_window"], "4")),
                                     "spec: sliding_window must be null or positive"),
    "spec eos out of the vocabulary": (_set((["spec", "eos_token_id"], 10**6)),
                                       "spec: field 'eos_token_id' must be a token id"),
    "spec bos a list": (_set((["spec", "bos_token_id"], [1])),
                        "spec: field 'bos_token_id' must be a token id"),
    "spec tie_word_embeddings a string": (_set((["spec", "tie_word_embeddings"], "false")),
                                          "spec: field 'tie_word_embeddings' must be true or false"),
    "spec dtype unknown": (_set((["spec", "dtype"], "int8")), "spec: field 'dtype': unsupported dtype"),
    "spec an unknown field": (_set((["spec", "experts"], 8)), "spec: unknown fields"),
    "not an object": (lambda m: Replace([m]), "corrupt manifest"),
}


@pytest.mark.parametrize("case", list(NESTED))
def test_nested_fields_are_named(fixture_fp32_artifact, tmp_path, case):
    edit, what = NESTED[case]
    artifact = edit_manifest(fixture_fp32_artifact, tmp_path / "artifact", edit)
    before = digest(artifact)
    with pytest.raises(ArtifactError):
        Artifact.open(artifact)
    assert_refused(run("inspect", artifact), what)
    assert digest(artifact) == before


@pytest.mark.parametrize("data, message", [
    ("tiny", "x: expected a JSON object"),
    ({"vocab_size": 10}, "x: required field 'hidden_size' is missing"),
    ({**PRESETS["tiny"].to_dict(), "top_k": "2"}, "x: field 'top_k' must be a positive integer"),
    ({**PRESETS["tiny"].to_dict(), "rms_norm_eps": None}, "x: field 'rms_norm_eps' must be a number"),
    ({**PRESETS["tiny"].to_dict(), "rope_theta": float("nan")}, "field 'rope_theta' must be a number"),
    ({**PRESETS["tiny"].to_dict(), "rope_theta": 10**400}, "field 'rope_theta' must be a number"),
    ({**PRESETS["tiny"].to_dict(), "sliding_window": [4]}, "sliding_window must be null or positive"),
    ({**PRESETS["tiny"].to_dict(), "eos_token_id": [2, "3"]}, "field 'eos_token_id' must be a token id"),
    ({**PRESETS["tiny"].to_dict(), "dtype": ["bf16"]}, "x: field 'dtype': unsupported dtype"),
    ({**PRESETS["tiny"].to_dict(), 3: 4}, "x: unknown fields"),
])
def test_spec_from_dict_refuses_malformed_specs_cleanly(data, message):
    with pytest.raises(ConfigError) as err:
        MixtralSpec.from_dict(data, source="x")
    assert message in str(err.value)
    assert MixtralSpec.from_dict(PRESETS["tiny"].to_dict()) == PRESETS["tiny"]


# ------------------------------------------------------------------------------- engine.json

@pytest.fixture(scope="module")
def engine(fixture_concat_artifact, tmp_path_factory) -> Path:
    """A TensorRT-RTX engine of the fp32 fixture, compiled ahead of time (no GPU needed); fp32
    engines are concat-layout ones (TensorRT's attention layer takes fp16 or bf16)."""
    out = tmp_path_factory.mktemp("engine") / "engine"
    result = run("engine", fixture_concat_artifact, "-o", out, *ENGINE_ARGS)
    assert result.exit_code == 0, result.output
    return out


ENGINE_REQUIRED = ["backend", "tensorrt", "compute_capability", "moe", "precision", "dtype", "spec",
                   "limits", "profiles", "inputs", "outputs", "plugins", "plugin_registration",
                   "layers", "builder", "source", "plan", "build"]


@pytest.mark.parametrize("key", ENGINE_REQUIRED)
def test_an_engine_manifest_missing_a_key_is_refused(engine, tmp_path, key):
    copy = edit_manifest(engine, tmp_path / "engine", lambda m: m.pop(key), "engine.json")
    before = digest(copy)
    assert_refused(run("inspect", copy), f"engine.json: required field '{key}' is missing",
                   "fix:      engine.json was edited or damaged; build the engine again")
    assert digest(copy) == before


ENGINE_WRONG = {
    "backend": (_set((["backend"], "onnxruntime")), "field 'backend' has an unknown value"),
    "tensorrt.module": (_set((["tensorrt", "module"], "tensorrt")),
                        "field 'tensorrt.module' has an unknown value"),
    "compute_capability": (_set((["compute_capability"], "eight")),
                           "field 'compute_capability': invalid compute capability 'eight'"),
    "limits": (_set((["limits", "max_context"], -1)), "field 'limits.max_context' does not match"),
    "profiles empty": (_set((["profiles"], [])), "field 'profiles' does not match"),
    "profile dims": (_set((["profiles", 0, "dims", "batch"], [1, 1])),
                     "field 'profiles[0].dims.batch' has the wrong type"),
    "profile shapes": (_set((["profiles", 1, "shapes", "input_ids", "max"], "16")),
                       "field 'profiles[1].shapes.input_ids.max' has the wrong type"),
    "inputs": (_set((["inputs", 0], "input_ids")), "field 'inputs[0]' has the wrong type"),
    "plan.sha256": (_set((["plan", "sha256"], 7)), "field 'plan.sha256' has the wrong type"),
    "plan.bytes": (_set((["plan", "bytes"], "18741348")), "field 'plan.bytes' has the wrong type"),
    "plan.file": (_set((["plan", "file"], "../engine.plan")), "field 'plan.file' has an unknown value"),
    "layers.items": (_set((["layers", "items"], {})), "field 'layers.items' has the wrong type"),
    "build.wall_s": (_set((["build", "wall_s"], "2 s")), "field 'build.wall_s' has the wrong type"),
    "plugin_registration": (_set((["plugin_registration"], None)),
                            "field 'plugin_registration' does not match"),
    "layout": (_set((["layout"], "paged")), "field 'layout' has an unknown value"),
    "logits of a concat engine": (_set((["logits"], "last")), "field 'logits' does not match"),
    "not an object": (lambda m: Replace("engine"), "corrupt engine manifest"),
}


@pytest.mark.parametrize("case", list(ENGINE_WRONG))
def test_an_engine_manifest_with_a_wrong_value_is_refused(engine, tmp_path, case):
    edit, what = ENGINE_WRONG[case]
    copy = edit_manifest(engine, tmp_path / "engine", edit, "engine.json")
    before = digest(copy)
    assert_refused(run("inspect", copy), what)
    assert digest(copy) == before


ENGINE_EDITS = {
    "precision fp32 -> fp16": (_set((["precision"], "fp16")), "precision",
                               "expected: fp32 (a float engine's precision is its dtype, float32)"),
    "precision fp32 -> int4": (_set((["precision"], "int4")), "source.precision",
                               'expected: int4', ),
    "dtype": (_set((["dtype"], "float16"), (["precision"], "fp16"), (["source", "dtype"], "float16"),
                   (["source", "precision"], "fp16")), "inputs[3]",
              "expected: past_key_values.0.key float16"),
    "num_layers": (_set((["spec", "num_layers"], 2)), "inputs", "expected: 7 inputs"),
    "vocab_size": (_set((["spec", "vocab_size"], 4096)), "outputs[0].dims",
                   "expected: ['batch', 'seq', 4096]"),
    "top_k (only the source artifact tells)": (
        _set((["spec", "top_k"], 1)), "spec.top_k", "expected: 2 (in "),
    "source precision": (_set((["source", "precision"], "fp16")), "source.precision",
                         "expected: fp32"),
}


@pytest.mark.parametrize("case", list(ENGINE_EDITS))
def test_an_engine_manifest_that_contradicts_its_source_is_refused(engine, tmp_path, case):
    edit, name, expected = ENGINE_EDITS[case]
    copy = edit_manifest(engine, tmp_path / "engine", edit, "engine.json")
    before = digest(copy)
    assert_refused(run("inspect", copy), f"field '{name}'", expected)
    assert_refused(run("run", copy, "--prompt", "def", "--device", "cuda"), f"field '{name}'")
    assert digest(copy) == before


def test_the_engine_and_its_source_agree(engine, fixture_concat_artifact):
    result = run("inspect", engine)
    assert result.exit_code == 0, result.output
    assert "verified" in result.output


def test_trt_runner_checks_the_plan_before_deserializing(engine, tmp_path, monkeypatch):
    """A changed engine.plan never reaches TensorRT's deserializer (which trusts its input)."""
    import torch

    import mixbuild.plugins.trt_plugins as trt_plugins
    from mixbuild.runtime.trt_runner import TrtRunner

    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    plan = copy / "engine.plan"
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF
    plan.write_bytes(bytes(data))
    before = digest(copy)

    class Module:
        __version__ = "test"

        class Logger:
            WARNING = ERROR = 0

            def __init__(self, *args):
                pass

        class Runtime:
            def __init__(self, *args):
                raise AssertionError("the plan reached the TensorRT runtime")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trt_plugins, "trt_module", lambda backend: Module)
    monkeypatch.setattr(trt_plugins, "register_plugins", lambda backend: None)
    recorded = json.loads((copy / "engine.json").read_text())["plan"]
    with pytest.raises(ArtifactError, match="engine plan is corrupt") as err:
        TrtRunner(copy)
    assert f"expected: {recorded['bytes']} bytes, sha256 {recorded['sha256'][:16]}..." in str(err.value)
    assert_refused(run("inspect", copy), "engine plan is corrupt (size or sha256 differs from "
                   "engine.json)", "fix:      build the engine again")
    assert digest(copy) == before
    plan.write_bytes(bytes(data[:-1]))                       # truncated
    with pytest.raises(ArtifactError, match="engine plan is corrupt") as err:
        TrtRunner(copy)
    assert f"found:    {recorded['bytes'] - 1} bytes" in str(err.value)
