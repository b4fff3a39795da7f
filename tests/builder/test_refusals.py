"""Impossible combinations fail before anything is built, with the stated message, and leave
nothing behind (no output directory, no temporary sibling)."""

from __future__ import annotations

import sys

import pytest

from mixbuild.builder import adapter as adapter_module
from mixbuild.builder.build import build_engine
from mixbuild.errors import MissingDependencyError, UsageError
from tests.builder.conftest import LIMITS, leftovers


def refused(artifact, out, match, error=UsageError, **kwargs):
    options = {"backend": "tensorrt-rtx", "compute_capability": "8.9", "moe": "plugin",
               "opt_level": 0, "progress": False, **LIMITS, **kwargs}
    with pytest.raises(error, match=match) as info:
        build_engine(artifact, out, **options)
    assert leftovers(out) == []
    return str(info.value)


@pytest.mark.parametrize("cc", ["8.6", "8.0", "7.5"])
def test_fp8_below_sm89_is_refused(trt, artifacts, tmp_path, cc):
    message = refused(artifacts["fp8"], tmp_path / "engine", "the fp8 artifact cannot run on "
                      f"compute capability {cc}", compute_capability=cc)
    assert "FP8 (E4M3) needs Ada (8.9)" in message and "expected: >= 8.9" in message


def test_int4_below_sm80_is_refused(trt, artifacts, tmp_path):
    refused(artifacts["int4"], tmp_path / "engine", "INT4 weights need Ampere", compute_capability="7.5")


def test_fp16_builds_are_not_refused_at_sm75(trt, artifacts, tmp_path):
    """The floor is per precision: fp16 passes preflight where fp8 and int4 are refused."""
    from mixbuild.builder.build import preflight
    from mixbuild.builder.options import BuildOptions

    options = BuildOptions.parse(compute_capability="7.5", **LIMITS)
    plan = preflight(artifacts["fp16"], tmp_path / "engine", options, overwrite=False)
    assert str(plan.target) == "7.5" and leftovers(tmp_path / "engine") == []


@pytest.mark.parametrize("cc", ["9.0", "10.0", "8.7"])
def test_compute_capability_tensorrt_rtx_cannot_target(trt, artifacts, tmp_path, cc):
    message = refused(artifacts["fp16"], tmp_path / "engine",
                      f"TensorRT-RTX .* cannot target compute capability {cc}", compute_capability=cc)
    assert "expected: 7.5, 8.0, 8.6, 8.9, 12.0, 12.1" in message
    assert "--backend tensorrt" in message


def test_no_gpu_and_no_compute_capability(trt, artifacts, tmp_path, monkeypatch):
    monkeypatch.setattr(adapter_module, "local_compute_capability", lambda: None)
    refused(artifacts["fp16"], tmp_path / "engine", "no GPU here to build for: TensorRT-RTX needs "
            "--compute-capability", compute_capability=None)


def test_missing_backend_names_the_extra(artifacts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)          # as if not installed
    message = refused(artifacts["fp16"], tmp_path / "engine", "needs the Python package "
                      "'tensorrt'", error=MissingDependencyError, backend="tensorrt")
    assert "pip install 'mixbuild[trt]'" in message
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    message = refused(artifacts["fp16"], tmp_path / "engine", "'tensorrt_rtx'",
                      error=MissingDependencyError)
    assert "pip install 'mixbuild[trt-rtx]'" in message


def test_existing_output_without_overwrite(trt, artifacts, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="output directory already exists"):
        build_engine(artifacts["fp16"], out, compute_capability="8.9", progress=False, **LIMITS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("kwargs, match", [
    ({"max_context": 4096}, "exceeds the model's max_position_embeddings"),
    ({"max_step_tokens": 128, "max_context": 64}, "--max-step-tokens exceeds --max-context"),
    ({"max_batch": 0}, "--max-batch must be a positive integer"),
    ({"opt_level": 6}, "--opt-level is out of range"),
    ({"compute_capability": "ampere"}, "invalid compute capability"),
    ({"backend": "onnxruntime"}, "unknown TensorRT backend"),
    ({"moe": "dense"}, "unknown --moe mode"),
])
def test_bad_options(artifacts, tmp_path, kwargs, match):
    refused(artifacts["fp16"], tmp_path / "engine", match, **kwargs)


def test_a_crashed_build_process_is_reported_and_leaves_nothing(trt, artifacts, tmp_path,
                                                                 monkeypatch):
    """A TensorRT abort (here simulated: the build process dies of SIGABRT) becomes an
    EngineBuildError with the log tail, and the atomic output directory is removed."""
    from mixbuild.builder import build as build_module

    real_popen = build_module.subprocess.Popen

    def aborting(cmd, **kwargs):
        script = "import os, sys; sys.stderr.write('terminate called\\n'); sys.stderr.flush(); os.abort()"
        return real_popen([sys.executable, "-c", script], **kwargs)

    monkeypatch.setattr(build_module.subprocess, "Popen", aborting)
    message = refused(artifacts["fp16"], tmp_path / "engine", r"build process crashed \(signal 6\)",
                      error=build_module.EngineBuildError)
    assert "terminate called" in message


@pytest.mark.parametrize("limits, dtype, hint", [
    ({"max_batch": 1, "max_step_tokens": 16, "max_context": 64}, "fp16", "--max-batch 2 or more"),
    ({"max_batch": 2, "max_step_tokens": 16, "max_context": 64}, "fp32", "--dtype fp16"),
])
def test_known_builder_failures_say_what_to_do(trt, fixture_dir, tmp_path, limits, dtype, hint):
    """Two failures TensorRT-RTX reports only deep in its log get a hint that names the fix."""
    from mixbuild.exporter.export import export_checkpoint

    artifact = export_checkpoint(fixture_dir, tmp_path / "a", dtype=dtype, layout="serving",
                                 progress=False)
    with pytest.raises(UsageError) as info:
        build_engine(artifact, tmp_path / "engine", backend="tensorrt-rtx", compute_capability="8.9",
                     opt_level=0, progress=False, **limits)
    assert hint in info.value.hint and not (tmp_path / "engine").exists()
