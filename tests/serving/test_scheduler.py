"""The continuous-batching scheduler: requests join and leave a running batch at any step and
get exactly the tokens they get alone; long prompts are prefilled in chunks beside the running
decodes; cancelled requests free their slots at once; the queue is bounded; a failing step or
a non-finite row ends only what it must, and the loop goes on."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import mixbuild.runtime as rt
from mixbuild.contract import Layout
from mixbuild.errors import ArtifactError, UsageError
from mixbuild.runtime.generate import FinishReason
from mixbuild.runtime.scheduler import Overloaded, Scheduler


@pytest.fixture(scope="module")
def serving_dir(fixture_fp32_artifact):
    return fixture_fp32_artifact        # the default export: the serving layout


@pytest.fixture(scope="module")
def alone(serving_dir):
    """The per-call runtime, one prompt at a time: the oracle."""
    model = rt.load(serving_dir, threads=1, max_batch=1, max_context=160,
                    continuous_batching=False)
    return lambda prompt, **kw: model.generate_ids([prompt], **kw)[0].token_ids


class Recording:
    """A serving step that records the per-row counts of every call, and can be held or made
    to fail or to return NaN for one request."""

    layout = Layout.SERVING

    def __init__(self, step) -> None:
        self.step, self.capacity = step, step.capacity
        self.calls: list[list[int]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.fail_next = False
        self.nan_row_with: int | None = None     # first token id of the row to poison

    def new_cache(self, **kw):
        return self.step.new_cache(**kw)

    def run(self, ids, positions, counts, cache):
        self.hold.wait(10)
        self.calls.append([int(c) for c in counts])
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected step failure")
        logits = self.step.run(ids, positions, counts, cache)
        if self.nan_row_with is not None:
            logits[ids[:, 0] == self.nan_row_with] = np.nan
        return logits


def scheduled(serving_dir, **options):
    model = rt.load(serving_dir, threads=1, max_context=160, **options)
    model.step = Recording(model.step)
    return model


PROMPTS = [[1, 755, 912, 300, 41], list(range(40, 70)), [5, 6, 7], list(range(100, 180)),
           [900, 12], list(range(300, 317)), [77] * 9]


def test_requests_that_join_and_leave_a_running_batch_get_the_tokens_they_get_alone(serving_dir,
                                                                                   alone):
    """7 requests on 3 slots, different prompt and output lengths, submitted while others run:
    rows join (including a 30-token and an 80-token prompt, prefilled in chunks of at most 16
    tokens beside the decodes), rows leave, and the last row moves into each freed slot."""
    model = scheduled(serving_dir, max_batch=3, step_tokens=16)
    model.step.hold.clear()        # the first step waits until three requests are queued
    handles = []
    for i, prompt in enumerate(PROMPTS):
        handles.append(model.submit_ids(prompt, max_new_tokens=6 + 3 * i))
        if i == 2:
            model.step.hold.set()
        time.sleep(0.002 * i)
    results = [h.result(timeout=60) for h in handles]
    for i, (prompt, result) in enumerate(zip(PROMPTS, results)):
        assert result.token_ids == alone(prompt, max_new_tokens=6 + 3 * i), f"request {i}"
        assert result.finish_reason is FinishReason.LENGTH
    calls = model.step.calls
    assert max(len(c) for c in calls) == 3 and max(sum(c) for c in calls) <= 16
    # the 80-token prompt took several iterations, and decodes ran beside its chunks
    assert any(sum(c) > 1 and c.count(1) >= 1 for c in calls)
    model.close()


def test_a_request_joining_at_step_5_gets_the_tokens_it_gets_alone(serving_dir, alone):
    model = scheduled(serving_dir, max_batch=2)
    first = model.submit_ids(PROMPTS[0], max_new_tokens=20)
    events = first.events()
    for _ in range(5):
        next(events)
    joined = model.submit_ids(PROMPTS[1], max_new_tokens=12)
    rest = [e.token_id for e in events if e.token_id is not None]
    assert joined.result(timeout=30).token_ids == alone(PROMPTS[1], max_new_tokens=12)
    assert len(rest) == 15 and first.result().token_ids == alone(PROMPTS[0], max_new_tokens=20)
    assert any(c == [1, 30] for c in model.step.calls), "the 30-token prefill ran beside a decode"
    model.close()


def test_seeded_sampling_is_the_same_whatever_shares_the_batch(serving_dir, alone):
    model = scheduled(serving_dir, max_batch=4)
    kw = [{"temperature": 0.9, "seed": s, "top_k": 40, "max_new_tokens": 10} for s in range(6)]
    handles = [model.submit_ids(p, **k) for p, k in zip(PROMPTS, kw)]
    for prompt, k, handle in zip(PROMPTS, kw, handles):
        assert handle.result(timeout=30).token_ids == alone(prompt, **k)
    model.close()


def test_concurrent_generate_calls_share_batches(serving_dir, alone):
    """Model.generate from 6 threads goes through one scheduler: their rows share steps."""
    model = scheduled(serving_dir, max_batch=6)
    out = {}

    def call(i):
        out[i] = model.generate_ids([PROMPTS[i]], max_new_tokens=12)[0].token_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(out[i] == alone(PROMPTS[i], max_new_tokens=12) for i in range(6))
    assert max(len(c) for c in model.step.calls) > 1, "no step ran two callers' rows together"
    model.close()


def test_cancel_frees_the_slot_for_the_next_request(serving_dir, alone):
    model = scheduled(serving_dir, max_batch=1)
    long = model.submit_ids(PROMPTS[0], max_new_tokens=120, ignore_eos=True)
    waiting = model.submit_ids(PROMPTS[2], max_new_tokens=5)
    events = long.events()
    next(events), next(events)
    long.cancel()
    result = long.result(timeout=10)
    assert result.finish_reason is FinishReason.CANCELLED and len(result.token_ids) < 120
    assert waiting.result(timeout=10).token_ids == alone(PROMPTS[2], max_new_tokens=5)
    snapshot = model.scheduler.metrics.snapshot()
    assert snapshot["finished"].get("cancelled") == 1 and snapshot["running"] == 0
    model.close()


def test_closing_a_stream_cancels_its_request(serving_dir):
    model = scheduled(serving_dir, max_batch=1)
    stream = model.stream_ids(PROMPTS[0], max_new_tokens=120, ignore_eos=True)
    next(stream), next(stream)
    stream.close()
    deadline = time.monotonic() + 10
    while not model.scheduler.idle and time.monotonic() < deadline:
        time.sleep(0.01)
    assert model.scheduler.idle and stream.result is None
    model.close()


def test_the_queue_is_bounded(serving_dir):
    model = scheduled(serving_dir, max_batch=1, max_queue=1)
    model.step.hold.clear()                                    # the running step stalls
    running = model.submit_ids(PROMPTS[0], max_new_tokens=4)
    deadline = time.monotonic() + 10
    while model.scheduler.metrics.snapshot()["running"] != 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    queued = model.submit_ids(PROMPTS[2], max_new_tokens=4)
    with pytest.raises(Overloaded, match="the request queue is full") as refused:
        model.submit_ids(PROMPTS[4], max_new_tokens=4)
    assert "at most 1 waiting requests" in refused.value.render()
    model.step.hold.set()
    assert len(running.result(timeout=30).token_ids) == 4 and len(queued.result(30).token_ids) == 4
    scheduler = model.scheduler
    assert scheduler.metrics.snapshot()["refused"] == 1
    model.close()
    with pytest.raises(Overloaded, match="shutting down"):
        scheduler.submit(queued.request)
    assert "mixbuild_requests_refused_total 1" in scheduler.metrics.prometheus()


def test_a_failing_step_ends_the_running_requests_and_the_loop_goes_on(serving_dir, alone):
    model = scheduled(serving_dir, max_batch=2)
    model.step.hold.clear()
    a = model.submit_ids(PROMPTS[0], max_new_tokens=4)
    b = model.submit_ids(PROMPTS[2], max_new_tokens=4)
    time.sleep(0.05)
    model.step.fail_next = True
    model.step.hold.set()
    for handle in (a, b):
        with pytest.raises(ArtifactError, match="the model step failed: RuntimeError: injected"):
            handle.result(timeout=10)
    later = model.submit_ids(PROMPTS[4], max_new_tokens=4)
    assert later.result(timeout=10).token_ids == alone(PROMPTS[4], max_new_tokens=4)
    model.close()


def test_non_finite_logits_end_only_their_request(serving_dir, alone):
    model = scheduled(serving_dir, max_batch=2)
    model.step.nan_row_with = PROMPTS[4][0]
    model.step.hold.clear()
    bad = model.submit_ids(PROMPTS[4], max_new_tokens=4)
    good = model.submit_ids(PROMPTS[2], max_new_tokens=4)
    model.step.hold.set()
    with pytest.raises(ArtifactError, match="non-finite logits"):
        bad.result(timeout=10)
    assert good.result(timeout=10).token_ids == alone(PROMPTS[2], max_new_tokens=4)
    assert model.scheduler.metrics.snapshot()["finished"]["error"] == 1
    model.close()


def test_logprobs_are_the_raw_distribution(serving_dir):
    model = scheduled(serving_dir, max_batch=2)
    handle = model.submit_ids(PROMPTS[0], logprobs=3, max_new_tokens=3)
    events = [e for e in handle.events() if e.token_id is not None]
    runner = rt.load(serving_dir, threads=1, max_batch=1, max_context=160,
                     continuous_batching=False)
    cache = runner.step.new_cache()
    cache.reset(1, 160)
    prompt = PROMPTS[0]
    logits = runner.step.run(np.array([prompt]), np.arange(len(prompt))[None],
                             np.array([len(prompt)]), cache)[0].astype(np.float64)
    expected = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    first = events[0].logprob
    assert first.token_id == events[0].token_id == int(np.argmax(expected))
    assert abs(first.logprob - expected[first.token_id]) < 1e-6
    assert [t for t, _ in first.top] == list(np.argsort(-expected)[:3])
    assert all(e.logprob.logprob <= 0 and len(e.logprob.top) == 3 for e in events)
    model.close()


def test_the_scheduler_refuses_bad_settings(serving_dir):
    model = rt.load(serving_dir, threads=1, max_context=64)
    with pytest.raises(ValueError, match="step_tokens and max_queue must be >= 1"):
        Scheduler(model.step, max_batch=1, capacity=64, step_tokens=0)
    with pytest.raises(UsageError, match="invalid load option 'max_queue'"):
        rt.load(serving_dir, max_queue=0)
    concat = rt.load(serving_dir, continuous_batching=False)
    with pytest.raises(UsageError, match="submit_ids needs a model with continuous batching"):
        concat.submit_ids([1, 2, 3])
    with pytest.raises(UsageError, match="invalid logprobs"):
        model.submit_ids([1, 2, 3], logprobs=-1)


def test_free_slots_take_a_burst_before_the_queue_counts(serving_dir):
    """max_batch 2, max_queue 1: a burst of 3 fits (2 slots about to be filled + 1 queued),
    the 4th is refused, even before the loop has admitted anyone."""
    model = scheduled(serving_dir, max_batch=2, max_queue=1)
    model.step.hold.clear()
    scheduler = model.scheduler
    with scheduler._cond:            # the loop cannot admit while the burst arrives
        handles = [scheduler.submit(model._requests([p], None, {"max_new_tokens": 3})[0])
                   for p in PROMPTS[:3]]
        with pytest.raises(Overloaded) as refused:
            scheduler.submit(model._requests([PROMPTS[3]], None, {"max_new_tokens": 3})[0])
    assert refused.value.reason == Overloaded.QUEUE_FULL
    model.step.hold.set()
    assert all(len(h.result(timeout=30).token_ids) == 3 for h in handles)
    model.close()


def test_a_raising_consumer_is_cancelled_and_the_loop_goes_on(serving_dir, alone):
    model = scheduled(serving_dir, max_batch=2)

    def broken(event):
        raise RuntimeError("consumer bug")
    bad = model.submit_ids(PROMPTS[0], max_new_tokens=40, ignore_eos=True, on_event=broken)
    good = model.submit_ids(PROMPTS[2], max_new_tokens=6)
    assert good.result(timeout=30).token_ids == alone(PROMPTS[2], max_new_tokens=6)
    assert bad.result(timeout=30).finish_reason is FinishReason.CANCELLED
    model.close()


def test_a_closed_model_refuses_new_requests(serving_dir):
    model = scheduled(serving_dir, max_batch=1)
    assert len(model.generate_ids([PROMPTS[2]], max_new_tokens=2)[0].token_ids) == 2
    model.close()
    with pytest.raises(Overloaded, match="the model is closed") as refused:
        model.submit_ids(PROMPTS[2], max_new_tokens=2)
    assert refused.value.reason == Overloaded.SHUTTING_DOWN
    with pytest.raises(Overloaded, match="the model is closed"):
        model.generate_ids([PROMPTS[2]], max_new_tokens=2)


def test_a_burst_is_admitted_together(serving_dir):
    """Requests arriving a millisecond apart wait for each other (a few ms at most) and prefill
    in one step; with the window off, the first starts alone."""
    for window, together in ((0.05, True), (0.0, False)):
        model = scheduled(serving_dir, max_batch=4)
        scheduler = model.scheduler
        scheduler.admit_window_s, scheduler.admit_max_s = window, 0.5
        handles = []
        for prompt in PROMPTS[:3]:
            handles.append(model.submit_ids(prompt, max_new_tokens=2))
            time.sleep(0.005)
        for h in handles:
            h.result(timeout=30)
        first = model.step.calls[0]
        assert (len(first) == 3) is together, (window, model.step.calls[:3])
        model.close()
