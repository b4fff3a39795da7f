"""Quantized artifacts on ONNX Runtime's fast kernels (mixbuild/schemes/ort.py): the
session runs QMoE (int4 experts), MatMulNBits at an explicit accuracy level (int4 linears) and
load-time-folded weights (fp8), computes what the artifact's own bodies compute, and never
changes the artifact's files."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

from mixbuild.contract import LOGITS
from mixbuild.runtime.ort_runner import OrtRunner
from mixbuild.runtime.runner import left_pad, prefill_feeds

PROMPTS = [[1, 755, 912, 300, 41, 7, 9], [1, 40, 41], [1, 1000, 1001, 1002, 1003, 17]]


@pytest.fixture(scope="module")
def quantized(fixture_export):
    """Concat-layout int4 and fp8 artifacts (all-position logits for the comparisons), the
    small calibration; the serving layout's rewrites are tested below."""
    from tests.conftest import small_quant

    return {p: fixture_export(quant=small_quant(p), layout="concat") for p in ("int4", "fp8")}


def optimized(runner_kwargs: dict, artifact, tmp_path) -> tuple[OrtRunner, onnx.ModelProto]:
    """The runner, and the graph ONNX Runtime actually runs (its optimized model)."""
    import onnxruntime as ort

    target = tmp_path / "optimized.onnx"
    original = ort.SessionOptions

    class Dumping(original):
        def __init__(self):
            super().__init__()
            self.optimized_model_filepath = str(target)
    ort.SessionOptions = Dumping
    try:
        runner = OrtRunner(artifact, threads=1, **runner_kwargs)
    finally:
        ort.SessionOptions = original
    return runner, onnx.load(str(target), load_external_data=False)


def prefill_logits(runner: OrtRunner) -> np.ndarray:
    ids, mask = left_pad(PROMPTS, 0)
    return runner.infer(prefill_feeds(runner.spec, ids, mask))[LOGITS]


def digest(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("precision", ["int4", "fp8"])
def test_the_fast_kernels_compute_what_the_artifact_bodies_do(quantized, precision, tmp_path):
    artifact = quantized[precision]
    before = digest(artifact)
    fast, graph = optimized({}, artifact, tmp_path)
    body = OrtRunner(artifact, threads=1, fast_quantized=False)
    got, want = prefill_logits(fast), prefill_logits(body)
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()   # measured: ~6e-7 relative
    assert (got.argmax(-1) == want.argmax(-1)).all()
    ops = {n.op_type for n in graph.graph.node}
    assert "DequantizeLinear" not in {n.op_type for n in graph.graph.node
                                      if any(i in {t.name for t in graph.graph.initializer}
                                             for i in n.input[:1])}, "a weight is dequantized per call"
    if precision == "int4":
        assert {"QMoE", "MatMulNBits"} <= ops and "MoEExperts" not in ops
        levels = {onnx.helper.get_attribute_value(a) for n in graph.graph.node
                  if n.op_type in ("QMoE", "MatMulNBits") for a in n.attribute
                  if a.name == "accuracy_level"}
        assert levels == {1}, "the int4 kernels must run float32 activations (W4A16) by default"
        assert fast.kernels["experts"] == "QMoE int4 x3 (accuracy_level 1)"
    else:
        assert fast.kernels["experts"] == "float32 weights folded at load"
        assert "QuantizeLinear" in ops            # the activations are still quantized (W8A8)
    assert digest(artifact) == before, "the artifact's files changed"


def test_int8_activations_are_an_explicit_choice(quantized, tmp_path):
    fast, graph = optimized({"accuracy_level": 4}, quantized["int4"], tmp_path)
    levels = {onnx.helper.get_attribute_value(a) for n in graph.graph.node
              if n.op_type in ("QMoE", "MatMulNBits") for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4} and "accuracy_level 4" in fast.kernels["experts"]


def test_generation_on_the_fast_kernels_matches_the_bodies(quantized):
    import mixbuild.runtime as rt
    from mixbuild.runtime.api import Model
    from mixbuild.runtime.steps import FeedStep

    model = rt.load(quantized["int4"], threads=1)
    body = OrtRunner(quantized["int4"], threads=1, fast_quantized=False)
    reference = Model(FeedStep(body), body.spec, model.tokenizer, model.defaults, model.options)
    prompts = ["def fibonacci(n):\n", "import os"]
    got = model.generate(prompts, max_new_tokens=24)
    want = reference.generate(prompts, max_new_tokens=24)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_the_serving_layout_combines_both_rewrites(fixture_export):
    from mixbuild.runtime.steps import ServingStep
    from tests.conftest import small_quant

    artifact = fixture_export(quant=small_quant("int4"))    # the default layout: serving
    fast = OrtRunner(artifact, threads=1)
    plain = OrtRunner(artifact, threads=1, fast_attention=False, fast_quantized=False)
    assert fast.kernels["attention"] == "GroupQueryAttention x3" and "QMoE" in fast.kernels["experts"]
    logits = []
    for runner in (fast, plain):
        step = ServingStep(runner, capacity=16, max_batch=1)
        cache = step.new_cache()
        cache.reset(1, 16)
        prompt = PROMPTS[0]
        logits.append(step.run(np.array([prompt]), np.arange(len(prompt))[None],
                               np.array([len(prompt)]), cache))
    assert np.abs(logits[0] - logits[1]).max() < 1e-4 * np.abs(logits[1]).max()


@pytest.mark.parametrize("precision, group, fused", [
    ("int4", 32, True),
    ("int4", 8, False),                      # group 8 < QMoE's 16: the body stays
    ("fp8", None, True),
])
def test_other_groups_one_token_and_empty_experts(fixture_export, precision, group, fused):
    """The fast kernels agree with the bodies at other group sizes, on a one-token prompt and a
    ragged batch (most experts get no token)."""
    from tests.conftest import small_quant

    extra = {"group_size": group} if group else {}
    artifact = fixture_export(quant=small_quant(precision, **extra), layout="concat")
    fast = OrtRunner(artifact, threads=1)
    body = OrtRunner(artifact, threads=1, fast_quantized=False)
    vocab = fast.spec.vocab_size
    for prompts in ([[3]], [[1, 5, 9, 2, 7], [4], [6, 8]]):
        ids, mask = left_pad([[t % vocab for t in p] for p in prompts], 0)
        got = fast.infer(prefill_feeds(fast.spec, ids, mask))[LOGITS]
        want = body.infer(prefill_feeds(body.spec, ids, mask))[LOGITS]
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    if precision == "int4":
        assert ("QMoE" in fast.kernels["experts"]) is fused, fast.kernels
        if not fused:
            assert any("group size 8" in n for n in fast.kernels["notes"])


def test_the_accuracy_level_reaches_the_session_from_load_and_validate(quantized, fixture_dir,
                                                                       tmp_path):
    """load(accuracy_level=4), `mixbuild validate --accuracy-level 4`: the kernels that ran are
    the int8-activation ones, and the report says so; anything else is refused, not ignored."""
    import json

    from click.testing import CliRunner

    import mixbuild.runtime as rt
    from mixbuild.cli import main
    from mixbuild.errors import UsageError

    model = rt.load(quantized["int4"], threads=1, accuracy_level=4)
    assert "accuracy_level 4" in model.step.runner.kernels["experts"]
    model.close()
    with pytest.raises(UsageError, match="accuracy_level"):
        rt.load(quantized["int4"], accuracy_level=2)
    with pytest.raises(UsageError, match="not of the torch backend"):
        rt.load(fixture_dir, accuracy_level=4)
    report = tmp_path / "report"
    result = CliRunner().invoke(main, ["validate", str(quantized["int4"]), "--reference",
                                       str(fixture_dir), "-o", str(report), "--accuracy-level", "4",
                                       "--max-sequences", "2", "--steps", "2", "--no-plot"])
    assert result.exit_code in (0, 1), result.output
    kernels = json.loads((report / "report.json").read_text())["kernels"]
    assert kernels["int4_linears"] == "MatMulNBits (accuracy_level 4)"
    result = CliRunner().invoke(main, ["validate", str(fixture_dir), "--reference", str(fixture_dir),
                                       "-o", str(tmp_path / "r2"), "--accuracy-level", "4"])
    assert result.exit_code == 2 and "--accuracy-level 4 cannot apply" in result.output
