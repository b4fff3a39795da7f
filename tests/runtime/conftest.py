"""Runtime fixtures: the trained fixture exported to an fp32 artifact, loaded once per session."""

from __future__ import annotations

import pytest

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\nclass Config", "    for key, value in"]


@pytest.fixture(scope="session")
def runtime_artifact(fixture_concat_artifact):
    """The per-call runtime's steps (FeedStep, OrtValueStep) run the concat
    layout; the serving layout's scheduler is tests/serving/'s and tests/serve/'s."""
    return fixture_concat_artifact


@pytest.fixture(scope="session")
def ort_model(fixture_fp32_artifact):
    """What users get: the default export (serving layout) through `load`'s scheduler."""
    import mixbuild.runtime as rt

    return rt.load(fixture_fp32_artifact, threads=1)


@pytest.fixture(scope="session")
def ort_feed_model(runtime_artifact):
    """The per-call runtime on a concat artifact (FeedStep): what `load` gives a concat export."""
    import mixbuild.runtime as rt

    return rt.load(runtime_artifact, threads=1)


@pytest.fixture(scope="session")
def ort_device_model(runtime_artifact, ort_model):
    """The ort backend with its KV cache as OrtValues (the device="cuda" path, run on CPU)."""
    from mixbuild.runtime import Model
    from mixbuild.runtime.ort_runner import OrtRunner
    from mixbuild.runtime.steps import OrtValueStep

    step = OrtValueStep(OrtRunner(runtime_artifact, threads=1), device="cpu")
    return Model(step, ort_model.spec, ort_model.tokenizer, ort_model.defaults, ort_model.options, "ort")


@pytest.fixture(scope="session")
def torch_model(fixture_dir):
    import mixbuild.runtime as rt

    return rt.load(fixture_dir, backend="torch")


@pytest.fixture(scope="session")
def hf_model(fixture_dir):
    import torch
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(fixture_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(fixture_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fixture_dir)
    tokenizer.padding_side = "left"
    return tokenizer
