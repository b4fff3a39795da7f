"""Clear MixbuildErrors for bad input: backends, directories, prompts, sampling values."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mixbuild.runtime as rt
from mixbuild.contract import ENGINE_FORMAT_VERSION
from mixbuild.errors import ArtifactError, MissingDependencyError, MixbuildError, UsageError
from mixbuild.runtime import Model
from mixbuild.runtime.ort_runner import OrtRunner
from tests.helpers import write_engine_dir


def test_unknown_backend(runtime_artifact):
    with pytest.raises(UsageError, match="unknown backend 'tensorflow'") as err:
        rt.load(runtime_artifact, backend="tensorflow")
    assert "ort | torch | trt" in str(err.value)


def test_unknown_device(runtime_artifact):
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        rt.load(runtime_artifact, device="tpu")


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match="model directory not found"):
        rt.load(tmp_path / "nowhere")


def test_directory_with_nothing_runnable(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ArtifactError, match="not a model directory") as err:
        rt.load(tmp_path)
    assert "notes.txt" in str(err.value)


def test_backend_that_does_not_open_the_directory(runtime_artifact):
    with pytest.raises(UsageError, match="backend 'torch' opens a Hugging Face checkpoint") as err:
        rt.load(runtime_artifact, backend="torch")
    assert "backend='ort'" in str(err.value)


def test_bad_load_options(runtime_artifact):
    with pytest.raises(UsageError, match="max_batch"):
        rt.load(runtime_artifact, max_batch=0)
    with pytest.raises(UsageError, match="max_context"):
        rt.load(runtime_artifact, max_context=-3)


@pytest.mark.parametrize("prompts, match", [([], "no prompts"), ([[]], "prompt 0 is empty"),
                                            ([[1, 2], [10 ** 6]], "outside the vocabulary"),
                                            (["text"], "not a list of token ids")])
def test_bad_token_prompts(ort_model, prompts, match):
    with pytest.raises(UsageError, match=match):
        ort_model.generate_ids(prompts)


def test_empty_text_prompt_list(ort_model):
    with pytest.raises(UsageError, match="no prompts"):
        ort_model.generate([])


@pytest.mark.parametrize("option, match", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2, "temperature": 1.0}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop"), ({"top_k": 5}, "greedy"), ({"beams": 4}, "unknown sampling option"),
    ({"temperature": float("nan")}, "temperature")])
def test_invalid_sampling_values(ort_model, option, match):
    with pytest.raises(UsageError, match=match):
        ort_model.generate("def", **option)


def test_per_prompt_sampling_must_match_prompt_count(ort_model):
    with pytest.raises(UsageError, match="one SamplingParams per prompt"):
        ort_model.generate_ids([[1, 5]], [rt.SamplingParams(), rt.SamplingParams()])


def test_text_needs_a_tokenizer(runtime_artifact):
    model = Model.from_runner(OrtRunner(runtime_artifact, threads=1))
    with pytest.raises(UsageError, match=r"no tokenizer\.json"):
        model.generate("def")
    assert model.generate_ids([[1, 5, 6]], max_new_tokens=3)[0].text is None


def test_chat_without_a_template(ort_model):
    bare = Model(ort_model.step, ort_model.spec, rt.Tokenizer(ort_model.tokenizer.backend, {}, None))
    with pytest.raises(UsageError, match="no chat template"):
        bare.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(UsageError, match="chat messages"):
        ort_model.chat([{"role": "user"}])


def test_trt_needs_cuda_and_names_its_extra(tmp_path, ort_model, monkeypatch):
    engine = write_engine_dir(tmp_path / "engine", ort_model.spec, backend="tensorrt")
    with pytest.raises(UsageError, match="CUDA GPU"):
        rt.load(engine, backend="trt")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if not installed
    with pytest.raises(MissingDependencyError) as err:
        rt.load(engine, device="cuda")  # auto picks trt from engine.plan + engine.json
    assert "mixbuild[trt]" in str(err.value)


def test_trt_manifest_errors(tmp_path):
    from mixbuild.runtime.trt_runner import TrtRunner

    (tmp_path / "engine.plan").write_bytes(b"")
    with pytest.raises(ArtifactError, match=r"engine\.json"):
        TrtRunner(tmp_path)
    (tmp_path / "engine.json").write_text("{}")
    with pytest.raises(ArtifactError, match="not an engine manifest"):
        TrtRunner(tmp_path)
    manifest = {"kind": "engine", "format_version": ENGINE_FORMAT_VERSION}
    (tmp_path / "engine.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="required field 'backend' is missing"):
        TrtRunner(tmp_path)


def test_errors_say_what_expected_found_fix_and_exit_2(runtime_artifact, ort_model):
    """A runtime error is one message (what failed, what was expected, what was found, what to
    do), and `mixbuild run` prints exactly that and exits with code 2, without a traceback."""
    from click.testing import CliRunner

    from mixbuild.cli import main

    prompt = "x = 1\n" * 1000
    tokens = len(ort_model.tokenizer.encode(prompt))
    assert tokens >= ort_model.spec.max_position_embeddings == 2048
    with pytest.raises(MixbuildError) as err:
        ort_model.generate(prompt)
    assert err.value.exit_code == 2
    assert str(err.value).splitlines() == [
        f"prompt 0 is too long: {tokens} tokens",
        "  expected: fewer than 2048 tokens, the context limit (max_position_embeddings), "
        "to leave room for one new token",
        f"  found:    {tokens} tokens",
        "  fix:      shorten the prompt"]
    done = CliRunner().invoke(main, ["run", str(runtime_artifact), "--prompt", prompt,
                                     "--threads", "1"])
    assert done.exit_code == 2, done.output
    assert done.output == f"error: {err.value}\n"


def test_import_is_light():
    code = ("import sys, mixbuild.runtime as rt; rt.SamplingParams; "
            "heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'transformers', 'jinja2') "
            "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_trt_without_a_gpu(tmp_path, ort_model):
    import importlib.util

    import torch

    if importlib.util.find_spec("tensorrt_rtx") is None or torch.cuda.is_available():
        pytest.skip("needs tensorrt_rtx installed on a machine without a GPU")
    write_engine_dir(tmp_path, ort_model.spec, plan=b"junk", backend="tensorrt-rtx")
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        rt.load(tmp_path, device="cuda")
