"""Streaming, sampling, stop conditions, context limits and batch compaction."""

from __future__ import annotations

import numpy as np
import pytest

from mixbuild.errors import UsageError
from mixbuild.runtime import FinishReason, Model, SamplingParams
from mixbuild.runtime.ort_runner import OrtRunner
from tests.runtime.conftest import PROMPTS


def test_defaults_come_from_generation_config(ort_model):
    assert ort_model.sampling().max_new_tokens == 64  # the fixture's generation_config.json
    assert ort_model.sampling().greedy
    assert ort_model.defaults.eos_token_ids == (2,)


@pytest.mark.parametrize("backend", ["ort", "ort_feed", "torch"])
def test_stream_concatenates_to_the_generated_text(request, backend):
    model = request.getfixturevalue(f"{backend}_model")
    stream = model.stream(PROMPTS[1], max_new_tokens=40)
    pieces = list(stream)
    expected = model.generate(PROMPTS[1], max_new_tokens=40)[0]
    assert "".join(pieces) == expected.text == stream.result.text
    assert stream.result.token_ids == expected.token_ids
    assert all(pieces) and len(pieces) > 1


def test_seeded_sampling_is_reproducible(ort_model):
    sample = dict(max_new_tokens=24, temperature=1.0, ignore_eos=True)
    a = ort_model.generate(PROMPTS[0], seed=1, **sample)[0].token_ids
    b = ort_model.generate(PROMPTS[0], seed=1, **sample)[0].token_ids
    c = ort_model.generate(PROMPTS[0], seed=2, **sample)[0].token_ids
    assert a == b and a != c


def test_seed_is_independent_of_batch_composition(ort_model):
    sample = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    alone = ort_model.generate(PROMPTS[2], **sample)[0]
    batched = ort_model.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], **sample)[1]
    assert batched.token_ids == alone.token_ids


def test_top_k_1_equals_greedy(ort_model):
    greedy = ort_model.generate(PROMPTS[0], max_new_tokens=16)[0].token_ids
    sampled = ort_model.generate(PROMPTS[0], max_new_tokens=16, temperature=1.5, top_k=1, seed=3)
    assert sampled[0].token_ids == greedy


def test_stop_string_cuts_the_text(ort_model):
    full = ort_model.generate(PROMPTS[0], max_new_tokens=32, ignore_eos=True)[0]
    stop = full.text[6:9]
    cut = full.text.find(stop)
    result = ort_model.generate(PROMPTS[0], max_new_tokens=32, ignore_eos=True, stop=[stop])[0]
    assert result.text == full.text[:cut]
    assert result.finish_reason is FinishReason.STOP and result.stopped_by == stop
    assert len(result.token_ids) < len(full.token_ids)
    stream = ort_model.stream(PROMPTS[0], max_new_tokens=32, ignore_eos=True, stop=[stop])
    assert "".join(stream) == result.text


def test_stop_token_id(ort_model):
    full = ort_model.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True)[0].token_ids
    token = full[5]
    result = ort_model.generate(PROMPTS[0], max_new_tokens=16, stop_token_ids=[token])[0]
    assert result.token_ids == full[:full.index(token) + 1]
    assert result.finish_reason is FinishReason.STOP and result.stopped_by == token


def test_prompt_longer_than_the_context_is_refused(runtime_artifact):
    import mixbuild.runtime as rt

    model = rt.load(runtime_artifact, max_context=16)
    with pytest.raises(UsageError, match="20 tokens") as err:
        model.generate_ids([[5] * 20])
    assert "16" in str(err.value) and "max_context" in str(err.value)
    clipped = model.generate_ids([[5] * 10], max_new_tokens=50, ignore_eos=True)[0]
    assert len(clipped.token_ids) == 6 and clipped.finish_reason is FinishReason.LENGTH


def test_position_limit_is_the_models(ort_model):
    limit = ort_model.spec.max_position_embeddings
    with pytest.raises(UsageError, match=f"{limit + 1} tokens") as err:
        ort_model.generate_ids([[5] * (limit + 1)])
    assert "max_position_embeddings" in str(err.value)


class CountingRunner:
    """Wraps a runner; records the batch size and mask width of every call."""

    def __init__(self, runner) -> None:
        self.runner, self.spec, self.name = runner, runner.spec, "counting"
        self.calls: list[tuple[int, int]] = []

    def infer(self, feeds):
        self.calls.append((feeds["input_ids"].shape[0], feeds["attention_mask"].shape[1]))
        return self.runner.infer(feeds)


STAGGERED = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (2, 5, 9)]


def test_finished_sequences_leave_the_batch(runtime_artifact, ort_model):
    counting = CountingRunner(OrtRunner(runtime_artifact, threads=1))
    model = Model.from_runner(counting, ort_model.tokenizer, ort_model.defaults)
    prompts = [ort_model.tokenizer.encode(p) for p in (PROMPTS[1], PROMPTS[0], PROMPTS[2])]
    results = model.generate_ids(prompts, STAGGERED)
    assert [b for b, _ in counting.calls] == [3, 3, 2, 2, 2, 1, 1, 1, 1]
    # the longest prompt (row 0) left after 2 tokens: its padding columns went with it
    assert len(prompts[0]) > max(len(prompts[1]), len(prompts[2]))
    widths = [w for _, w in counting.calls]
    assert widths[1] == len(prompts[0]) + 1
    assert widths[2] == max(len(prompts[1]), len(prompts[2])) + 2
    for prompt, params, result in zip(prompts, STAGGERED, results):
        alone = ort_model.generate_ids([prompt], params)[0]
        assert result.token_ids == alone.token_ids and len(result.token_ids) == params.max_new_tokens


class CountingStep:
    def __init__(self, step) -> None:
        self.step, self.new_cache, self.sizes, self.caches = step, step.new_cache, [], []
        self.layout = step.layout

    def __call__(self, input_ids, *rest):
        self.sizes.append(input_ids.shape[0])
        self.caches.append(rest[-1])
        return self.step(input_ids, *rest)


@pytest.mark.parametrize("backend, step_type", [("ort_feed", "FeedStep"),
                                                ("ort_device", "OrtValueStep")])
def test_per_call_steps_compact_the_batch(request, backend, step_type, ort_model):
    bound = request.getfixturevalue(f"{backend}_model")
    assert type(bound.step).__name__ == step_type
    step = CountingStep(bound.step)
    model = Model(step, ort_model.spec, ort_model.tokenizer, ort_model.defaults)
    prompts = [ort_model.tokenizer.encode(p) for p in PROMPTS]
    results = model.generate_ids(prompts, STAGGERED)
    assert step.sizes == [3, 3, 2, 2, 2, 1, 1, 1, 1]
    for prompt, params, result in zip(prompts, STAGGERED, results):
        assert result.token_ids == ort_model.generate_ids([prompt], params)[0].token_ids


def test_kv_caches_are_reused_across_calls(ort_device_model):
    """One call after another borrows the same cache from the pool (a model of its own: the
    session's model has pooled one cache per concurrent call of other tests)."""
    shared = ort_device_model
    model = Model(shared.step, shared.spec, shared.tokenizer, shared.defaults)
    model.generate(PROMPTS, max_new_tokens=8)
    with model.caches.borrow() as cache:
        before = cache
    model.generate(PROMPTS[:2], max_new_tokens=8)
    with model.caches.borrow() as cache:
        assert cache is before and len(model.caches.free) == 0


def test_more_prompts_than_max_batch(runtime_artifact, ort_model):
    import mixbuild.runtime as rt

    small = rt.load(runtime_artifact, max_batch=2, threads=1)
    prompts = PROMPTS + PROMPTS[:1]
    assert [r.token_ids for r in small.generate(prompts, max_new_tokens=6)] == \
        [r.token_ids for r in ort_model.generate(prompts, max_new_tokens=6)]


def test_timings_are_filled(ort_model):
    t = ort_model.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True)[0].timings
    assert t.generated_tokens == 8 and 0 < t.time_to_first_token_s <= t.total_s
    assert t.tokens_per_s > 0 and t.decode_tokens_per_s > 0


def test_repetition_penalty_changes_greedy_output(ort_model):
    plain = ort_model.generate(PROMPTS[2], max_new_tokens=24, ignore_eos=True)[0].token_ids
    penalized = ort_model.generate(PROMPTS[2], max_new_tokens=24, ignore_eos=True,
                                   repetition_penalty=3.0)[0].token_ids
    assert plain != penalized
    assert len(set(penalized)) >= len(set(plain))


def test_numpy_token_ids_are_accepted(ort_model):
    ids = np.array(ort_model.tokenizer.encode(PROMPTS[0]))
    assert ort_model.generate_ids([ids], max_new_tokens=4)[0].token_ids == \
        ort_model.generate(PROMPTS[0], max_new_tokens=4)[0].token_ids


def test_a_stream_can_be_abandoned(ort_feed_model):
    """close() ends the per-call decode loop where it is and hands the KV cache back to the
    pool (the scheduler's cancellation is tests/serving/test_scheduler.py's)."""
    ort_model = ort_feed_model
    step = CountingStep(ort_model.step)
    model = Model(step, ort_model.spec, ort_model.tokenizer, ort_model.defaults)  # its own pool
    stream = model.stream(PROMPTS[0], max_new_tokens=30, ignore_eos=True)
    assert next(stream)
    computed = len(step.sizes)
    assert computed < 30 and model.caches.free == []  # the open stream holds the only cache
    stream.close()
    assert stream.result is None
    assert model.caches.free == [step.caches[-1]], "close() did not return the KV cache"
    assert list(stream) == [] and len(step.sizes) == computed  # nothing more is computed
    model.generate(PROMPTS[1], max_new_tokens=2)
    assert model.caches.free == [step.caches[-1]] and step.caches[-1] is step.caches[0]  # reused


def _numpy_conversions_and_bindings(monkeypatch):
    """Record every OrtValue -> numpy conversion, numpy -> OrtValue upload, OrtValue bound as an
    input and IOBinding output list, at the onnxruntime API the OrtValue step goes through."""
    import onnxruntime as ort

    seen = {"numpy": [], "uploads": 0, "bound": [], "outputs": []}
    to_numpy, upload = ort.OrtValue.numpy, ort.OrtValue.ortvalue_from_numpy.__func__
    bind, get_outputs = ort.IOBinding.bind_ortvalue_input, ort.IOBinding.get_outputs

    def counting_numpy(value):
        seen["numpy"].append(value)
        return to_numpy(value)

    def counting_upload(cls, *args, **kwargs):
        seen["uploads"] += 1
        return upload(cls, *args, **kwargs)

    def recording_bind(io, name, value):
        if not seen["bound"] or seen["bound"][-1][0] is not io:
            seen["bound"].append((io, {}))
        seen["bound"][-1][1][name] = value
        return bind(io, name, value)

    def recording_outputs(io):
        outputs = get_outputs(io)
        seen["outputs"].append(outputs)
        return outputs

    monkeypatch.setattr(ort.OrtValue, "numpy", counting_numpy)
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", classmethod(counting_upload))
    monkeypatch.setattr(ort.IOBinding, "bind_ortvalue_input", recording_bind)
    monkeypatch.setattr(ort.IOBinding, "get_outputs", recording_outputs)
    return seen


def test_ortvalue_step_feeds_the_presents_back_as_past(ort_device_model, ort_model, monkeypatch):
    """The device-resident KV cache path (`OrtValueStep`, what load(device="cuda") uses), run
    with CPU OrtValues: every decode step binds the previous step's present OrtValues (the same
    objects, the same memory) as its past, no cache tensor is ever converted to numpy or
    uploaded again, only the logits come back to numpy, and the tokens are the plain path's.

    What only CUDA can show is left out (no GPU here): that load(device="cuda") picks this step
    with device "cuda" (it needs onnxruntime-gpu's CUDAExecutionProvider) and that the presents
    ORT allocates then live in GPU memory (OrtValue.device_name() == "cuda").
    """
    model = ort_device_model
    assert model.step.device == "cpu"
    names = [past for past, _ in model.step.new_cache().names]
    # equal budgets and ignore_eos: no request leaves early, so no compaction (which goes
    # through host memory by design) happens
    seen = _numpy_conversions_and_bindings(monkeypatch)
    results = model.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
    monkeypatch.undo()
    plain = ort_model.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
    assert [r.token_ids for r in results] == [r.token_ids for r in plain]

    steps = len(seen["outputs"])
    assert steps == 6 and len(seen["bound"]) == steps
    assert seen["uploads"] == 1, "the KV cache went through numpy -> OrtValue uploads"
    for n in range(1, steps):
        bound = seen["bound"][n][1]
        presents = seen["outputs"][n - 1][:len(names)]
        assert all(bound[name] is value for name, value in zip(names, presents)), \
            f"decode step {n} did not bind the previous step's present OrtValues as its past"
        assert [bound[name].data_ptr() for name in names] == [v.data_ptr() for v in presents]
        assert all(v.device_name() == "cpu" for v in presents)
    logits = [outputs[len(names)] for outputs in seen["outputs"]]
    assert len(seen["numpy"]) == steps and all(
        any(v is value for value in logits) for v in seen["numpy"]), \
        "an OrtValue other than the logits was converted to numpy"
