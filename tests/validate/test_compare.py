"""End to end: the mixbuild reference model against transformers, clean and with a broken expert."""

import numpy as np
import pytest

from mixbuild.errors import MixbuildError
from mixbuild.model.presets import PRESETS
from mixbuild.runtime.runner import prefill_feeds
from mixbuild.runtime.torch_runner import TorchRunner
from mixbuild.validate.compare import validate
from mixbuild.validate.data import Batch, evaluation_batches, make_batches
from mixbuild.validate.experts import ExpertWeightPair, hf_expert_weights, torch_expert_weights
from mixbuild.validate.hf_runner import HFRunner
from mixbuild.validate.tolerances import THRESHOLDS, load_tolerances
from tests.conftest import FIXTURE

STEPS = 6


@pytest.fixture(scope="module")
def hf_runners(hf_checkpoints):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = HFRunner(hf_checkpoints[name], router_logits=True, hidden_states=True,
                                   moe_inputs=True)
        return cache[name]
    return get


def random_batches(vocab, lengths=(14, 9, 11), batch_size=2, seed=0):
    rng = np.random.default_rng(seed)
    return make_batches([rng.integers(3, vocab, n) for n in lengths], batch_size)


def run(hf, torch_runner, name, **kwargs):
    spec = PRESETS[name]
    weights = ExpertWeightPair(hf_expert_weights(hf), torch_expert_weights(torch_runner))
    return validate(hf, torch_runner, spec, random_batches(spec.vocab_size), STEPS,
                    load_tolerances("fp32"), expert_weights=weights, **kwargs)


@pytest.mark.parametrize("name", ["tiny", "tiny-e4k1-mqa", "tiny-e8k3-mha"])
def test_reference_model_passes_at_fp32(hf_checkpoints, hf_runners, name):
    ours = TorchRunner.from_checkpoint(hf_checkpoints[name], debug=True)
    report = run(hf_runners(name), ours, name)
    spec = PRESETS[name]
    assert report.passed, report.failed_checks
    assert {c.name for c in report.checks} == set(THRESHOLDS) and report.skipped == ()
    m = report.metrics
    assert m.logits_max_abs <= 1e-4 and m.top1_agreement == 1.0 and m.kl_mean < 1e-9
    assert m.ppl_reference == pytest.approx(m.ppl_artifact, rel=1e-5)
    low, high = m.top1_agreement_ci95  # all positions agree: the interval ends at 1
    assert high == 1.0 and 1.0 - 4.0 / m.positions < low < 1.0
    assert (m.greedy_steps, m.greedy_match_steps, m.first_divergence) == (3 * STEPS, 3 * STEPS, None)
    assert len(report.layers) == spec.num_layers
    for layer in report.layers:
        assert layer.hidden_max_abs <= 1e-4 and layer.router_logits_max_abs <= 1e-5
        assert layer.router_flip_rate == 0.0 and layer.tokens == 34
        assert len(layer.expert_max_abs) == spec.num_experts
        assert sum(layer.expert_tokens) == 34 * spec.top_k
        assert all(e is None or e <= 1e-5 for e in layer.expert_max_abs)


@pytest.mark.parametrize("name, layer", [("tiny", 0), ("tiny-e4k1-mqa", 1)])
def test_broken_expert_fails_and_is_located(hf_checkpoints, hf_runners, name, layer):
    hf = hf_runners(name)
    spec = PRESETS[name]
    batch = random_batches(spec.vocab_size)[0]
    routed = hf.infer(prefill_feeds(spec, batch.input_ids, batch.attention_mask))[f"debug.{layer}.expert_ids"]
    expert = int(np.bincount(routed.reshape(-1), minlength=spec.num_experts).argmax())
    ours = TorchRunner.from_checkpoint(hf_checkpoints[name], debug=True)
    ours.model.layers[layer].moe.w_gate_up.data[expert] *= 3

    report = run(hf, ours, name)
    assert not report.passed
    failed = {c.name for c in report.failed_checks}
    assert {"logits_max_abs", "kl_mean"} <= failed
    assert (report.worst.layer, report.worst.expert) == (layer, expert)
    assert report.worst.basis == "expert_rel_error"   # an outlier among all experts
    errors = report.layers[layer].expert_max_abs
    assert errors[expert] > 0.1
    assert all(e is None or e == 0.0 for i, e in enumerate(errors) if i != expert)


def test_runner_without_debug_outputs_skips_router_checks(hf_checkpoints, hf_runners):
    ours = TorchRunner.from_checkpoint(hf_checkpoints["tiny"])
    report = validate(hf_runners("tiny"), ours, PRESETS["tiny"], random_batches(128), 0,
                      load_tolerances("fp32"))
    assert report.passed
    assert set(report.skipped) == {"router_flip_rate", "greedy_match_fraction"}
    assert report.worst is None
    assert all(lr.router_flip_rate is None and lr.hidden_max_abs is None for lr in report.layers)
    assert report.metrics.greedy_steps == 0


def test_evaluation_text_through_the_tokenizer(hf_checkpoints, hf_runners, char_tokenizer):
    batches = evaluation_batches(char_tokenizer, max_tokens=24, batch_size=2, bos_id=1,
                                 max_sequences=3)
    ours = TorchRunner.from_checkpoint(hf_checkpoints["tiny"], debug=True)
    report = validate(hf_runners("tiny"), ours, PRESETS["tiny"], batches, 2, load_tolerances("fp32"))
    assert report.passed and report.metrics.sequences == 3 and report.metrics.positions == 72


def test_input_errors(hf_checkpoints, hf_runners):
    hf = hf_runners("tiny")
    tol = load_tolerances("fp32")
    spec = PRESETS["tiny"]
    too_big = Batch(np.array([[5, 500]], np.int64), np.ones((1, 2), np.int64))
    with pytest.raises(MixbuildError, match="outside the model's vocabulary"):
        validate(hf, hf, spec, [too_big], 1, tol)
    with pytest.raises(MixbuildError, match="at least one batch"):
        validate(hf, hf, spec, [], 1, tol)
    with pytest.raises(MixbuildError, match="must not be negative"):
        validate(hf, hf, spec, random_batches(128), -1, tol)


@pytest.mark.skipif(not (FIXTURE / "config.json").is_file(),
                    reason="the trained fixture has not been built (make fixture)")
def test_trained_fixture_passes_at_fp32(fixture_dir):
    hf = HFRunner(fixture_dir, router_logits=True, hidden_states=True, moe_inputs=True)
    ours = TorchRunner.from_checkpoint(fixture_dir, debug=True)
    batches = evaluation_batches(fixture_dir, max_tokens=96, batch_size=2,
                                 bos_id=hf.spec.bos_token_id, max_sequences=4)
    weights = ExpertWeightPair(hf_expert_weights(hf), torch_expert_weights(ours))
    report = validate(hf, ours, hf.spec, batches, 8, load_tolerances("fp32"), weights)
    assert report.passed, report.failed_checks
    assert report.metrics.ppl_reference < hf.spec.vocab_size / 4  # trained: far below uniform
