"""`mixbuild validate --backend / --device / --dtype`: the torch backend validates a checkpoint
(mixbuild's reference model, the Triton MoE kernels on CUDA) against transformers; options
that cannot apply are refused before any work is done."""

import json

import pytest
import torch
from click.testing import CliRunner

from mixbuild.cli import main

FAST = ["--max-sequences", "2", "--steps", "4", "--max-tokens", "32", "--no-plot"]


def invoke(*args):
    return CliRunner().invoke(main, ["validate", *map(str, args)])


@pytest.mark.parametrize("dtype, precision", [(None, "fp32"), ("bf16", "bf16")])
def test_torch_backend_validates_a_checkpoint(fixture_dir, tmp_path, dtype, precision):
    # bf16 is judged on 95% intervals (top-1's lower end must reach 0.98): that takes a few
    # hundred positions, more than FAST's 64
    extra = ["--dtype", dtype, "--max-sequences", "4", "--max-tokens", "128"] if dtype else []
    result = invoke(fixture_dir, "--reference", fixture_dir, "--backend", "torch", "--device",
                    "cpu", "-o", tmp_path / "report", *FAST, *extra)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    assert doc["passed"] is True
    assert (doc["backend"], doc["precision"]) == ("torch", precision)
    assert doc["metrics"]["greedy_match_steps"] == doc["metrics"]["greedy_steps"] > 0


def test_auto_picks_torch_for_a_checkpoint(fixture_dir, tmp_path):
    result = invoke(fixture_dir, "--reference", fixture_dir, "-o", tmp_path / "r", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "report.json").read_text())["backend"] == "torch"


@pytest.mark.parametrize("args, message", [
    (["--backend", "ort"], "the ort backend cannot validate"),
    (["--backend", "trt", "--device", "cuda"], "the trt backend cannot validate"),
    (["--backend", "auto", "--dtype", "bf16", "ARTIFACT"], "--dtype has no effect"),
])
def test_refusals(fixture_dir, fixture_fp32_artifact, tmp_path, args, message):
    model = fixture_dir
    if "ARTIFACT" in args:
        args, model = args[:-1], fixture_fp32_artifact
    result = invoke(model, "--reference", fixture_dir, "-o", tmp_path / "r", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(fixture_dir, tmp_path):
    result = invoke(fixture_dir, "--reference", fixture_dir, "--backend", "torch", "--device",
                    "cuda", "-o", tmp_path / "r")
    assert result.exit_code == 2 and "sees no CUDA GPU" in result.output, result.output
