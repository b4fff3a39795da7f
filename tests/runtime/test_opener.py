"""mixbuild.runtime.opener: every kind of model directory resolves to its backend, and every
combination of backend, device and accuracy level either opens or is refused with the usual
clear error, the same for `load` (run, serve), validate and inspect."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import mixbuild.runtime as rt
from mixbuild.cli import main
from mixbuild.contract import Backend, Layout
from mixbuild.errors import ArtifactError, UsageError
from mixbuild.model.checkpoint import Checkpoint
from mixbuild.runtime.opener import ModelDir, ModelKind
from tests.helpers import write_engine_dir


@pytest.fixture(scope="module")
def dirs(fixture_dir, fixture_fp32_artifact, fixture_concat_artifact, tmp_path_factory):
    root = tmp_path_factory.mktemp("opener")
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text((fixture_dir / "config.json").read_text())
    (hf / "mixbuild_checkpoint.json").write_text("{}")
    return {"serving artifact": fixture_fp32_artifact, "concat artifact": fixture_concat_artifact,
            "checkpoint": fixture_dir, "hf": hf,
            "engine": write_engine_dir(root / "engine", Checkpoint(fixture_dir).spec)}


@pytest.mark.parametrize("name, kind", [
    ("serving artifact", ModelKind.ARTIFACT), ("concat artifact", ModelKind.ARTIFACT),
    ("checkpoint", ModelKind.CHECKPOINT), ("hf", ModelKind.HF_QUANTIZED),
    ("engine", ModelKind.ENGINE),
])
def test_each_kind_resolves_to_its_backend(dirs, name, kind):
    model_dir = ModelDir.resolve(dirs[name])
    assert model_dir.kind is kind
    assert model_dir.backend is {ModelKind.ARTIFACT: Backend.ORT, ModelKind.ENGINE: Backend.TRT,
                                 ModelKind.CHECKPOINT: Backend.TORCH,
                                 ModelKind.HF_QUANTIZED: Backend.TORCH}[kind]
    assert model_dir.choose("auto", "cpu" if kind is not ModelKind.ENGINE else "cuda") is model_dir.backend


def test_layouts_are_read_from_the_manifests(dirs, fixture_dir, tmp_path):
    serving = write_engine_dir(tmp_path / "engine", Checkpoint(fixture_dir).spec, layout="serving")
    assert ModelDir.resolve(serving).layout() is Layout.SERVING
    assert ModelDir.resolve(dirs["serving artifact"]).layout() is Layout.SERVING
    assert ModelDir.resolve(dirs["concat artifact"]).layout() is Layout.CONCAT
    assert ModelDir.resolve(dirs["engine"]).layout() is Layout.CONCAT   # no "layout": older manifests
    assert ModelDir.resolve(dirs["checkpoint"]).layout() is None


@pytest.mark.parametrize("name, backend, device, level, message", [
    ("serving artifact", "torch", "cpu", 1, "the torch backend cannot open"),
    ("checkpoint", "ort", "cpu", 1, "backend 'ort' opens an ONNX artifact"),
    ("hf", "trt", "cuda", 1, "the trt backend cannot open"),
    ("engine", "auto", "cpu", 1, "runs TensorRT engines on a CUDA GPU"),
    ("hf", "auto", "cuda", 1, "float32 on the CPU"),
    ("checkpoint", "torch", "cpu", 4, "--accuracy-level 4 cannot apply"),
    ("serving artifact", "ort", "cpu", 3, "--accuracy-level 3 cannot apply"),
    ("checkpoint", "auto", "cuda", 1, "torch sees no CUDA GPU"),
])
def test_combinations_that_cannot_work_are_refused(dirs, name, backend, device, level, message,
                                                   monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match=message):
        ModelDir.resolve(dirs[name]).choose(backend, device, level)


def test_what_is_not_a_model_directory_is_named(tmp_path):
    with pytest.raises(ArtifactError, match="model directory not found"):
        ModelDir.resolve(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ArtifactError, match="not a model directory") as err:
        ModelDir.resolve(tmp_path)
    assert "notes.txt" in str(err.value) and "--format hf" in str(err.value)


def test_load_and_validate_refuse_alike(dirs, fixture_dir, tmp_path):
    """The same refusal from the library and from `validate` (one opener behind both)."""
    with pytest.raises(UsageError, match="the torch backend cannot open"):
        rt.load(dirs["serving artifact"], backend="torch")
    result = CliRunner().invoke(main, ["validate", str(dirs["serving artifact"]), "--reference",
                                       str(fixture_dir), "--backend", "torch"])
    assert result.exit_code == 2 and "the torch backend cannot validate" in result.output


def test_validate_refuses_a_serving_layout_engine_before_loading_tensorrt(dirs, fixture_dir,
                                                                          tmp_path):
    """validate's trt pass compares the concat layout's outputs; a serving engine (the engine of
    a default export) is refused with what to do, not wrapped as a concat runner."""
    engine = write_engine_dir(tmp_path / "engine", Checkpoint(fixture_dir).spec, layout="serving")
    result = CliRunner().invoke(main, ["validate", str(engine), "--reference", str(fixture_dir),
                                       "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "serving-layout engine" in result.output and "validate the artifact" in result.output
