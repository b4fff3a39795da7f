"""TrtServingStep's binding contract, with a stand-in for the TensorRT execution context (no
machine here has TensorRT and a GPU): each layer's cache input and updated output get the same
address (in place), shapes follow the batch, the profile is picked from the feed shapes, and
the scheduler's per-row lengths advance. What TensorRT computes is unverified here."""

from __future__ import annotations

import contextlib
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mixbuild.contract import CACHE_LENGTHS, INPUT_IDS, INPUT_LENGTHS, LOGITS, Layout, cache_pairs
from mixbuild.errors import ArtifactError, UsageError
from mixbuild.model.presets import PRESETS
from mixbuild.runtime.trt_runner import TrtServingStep


class FakeContext:
    """Records set_input_shape / set_tensor_address; 'executes' by writing each new token id
    into every cache buffer at the row's position, and logits = one-hot of the token + 1."""

    def __init__(self, owner) -> None:
        self.owner, self.shapes, self.addresses = owner, {}, {}
        self.calls, self.pause_at, self.resume = 0, None, threading.Event()

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def execute_async_v3(self, stream):
        self.calls += 1
        if self.calls == self.pause_at:
            self.resume.wait(10)
        feeds = self.owner.bound
        ids, lengths, counts = feeds[INPUT_IDS], feeds[CACHE_LENGTHS], feeds[INPUT_LENGTHS]
        for tensor in self.owner.cache.buffers:
            for b in range(ids.shape[0]):
                for s in range(int(counts[b])):
                    tensor[b, :, int(lengths[b]) + s] = float(ids[b, s])
        logits = self.owner.outputs[LOGITS]
        logits.zero_()
        for b in range(ids.shape[0]):
            logits[b, (int(ids[b, int(counts[b]) - 1]) + 1) % logits.shape[1]] = 1.0
        return True


class FakeRunner:
    def __init__(self, spec, layout="serving", capacity=16) -> None:
        self.spec = spec
        # the EngineManifest fields the serving step reads
        self.manifest = SimpleNamespace(
            layout=Layout(layout), cache_capacity=capacity,
            limits={"max_batch": 4, "max_step_tokens": 8, "max_context": capacity})
        self.context = FakeContext(self)
        self.lock, self.stream = threading.Lock(), type("S", (), {"cuda_stream": 0,
                                                                 "synchronize": lambda self: None})()
        self.bound, self.outputs, self.selected = {}, {}, []

    def _torch_dtype(self, name):
        return torch.float32

    def _select_shapes(self, shapes):
        self.selected.append(shapes)

    def _bind_input(self, name, array):
        self.bound[name] = array
        return torch.from_numpy(array)

    def _bind_output(self, name):
        batch = self.bound[INPUT_IDS].shape[0]
        self.outputs[name] = torch.empty(batch, self.spec.vocab_size)
        return self.outputs[name]


@pytest.fixture
def step(monkeypatch):
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    runner = FakeRunner(PRESETS["tiny"])
    step = TrtServingStep(runner, max_batch=3)
    step.device = "cpu"
    runner.cache = step.new_cache()
    return step, runner


def test_each_layer_cache_is_updated_in_place_at_the_rows_lengths(step):
    step, runner = step
    cache = runner.cache
    assert cache.capacity == 16 and cache.buffers[0].shape[0] == 3
    ids = np.array([[5, 6, 7], [9, 0, 0]])
    logits = step.run(ids, np.array([[0, 1, 2], [0, 0, 0]]), np.array([3, 1]), cache)
    assert list(cache.lengths[:2]) == [3, 1] and logits.shape == (2, PRESETS["tiny"].vocab_size)
    assert logits[0].argmax() == 8 and logits[1].argmax() == 10
    context = runner.context
    for (name, updated), buffer in zip(cache_pairs(step.spec.num_layers), cache.buffers):
        assert context.addresses[name] == context.addresses[updated] == buffer.data_ptr()
        assert context.shapes[name] == (2, *buffer.shape[1:])
    assert cache.buffers[0][0, 0, :3, 0].tolist() == [5.0, 6.0, 7.0]
    step.run(np.array([[4], [3]]), np.array([[3], [1]]), np.array([1, 1]), cache)
    assert list(cache.lengths[:2]) == [4, 2] and cache.buffers[-1][1, 0, 1, 0].item() == 3.0
    assert runner.selected[-1][cache_pairs(step.spec.num_layers)[0][0]] == (2, *cache.buffers[0].shape[1:])


def test_a_concat_engine_or_a_larger_batch_is_refused(monkeypatch):
    with pytest.raises(ArtifactError, match="not built from a serving-layout artifact"):
        TrtServingStep(FakeRunner(PRESETS["tiny"], layout="concat"), max_batch=2)
    with pytest.raises(UsageError, match="max_batch is larger than the engine's"):
        TrtServingStep(FakeRunner(PRESETS["tiny"]), max_batch=5)


def test_the_scheduler_keeps_steps_within_a_fixed_capacity(step):
    """An engine's capacity has no headroom: a prompt joining a row near the end of the cache
    is prefilled in chunks narrow enough that no row's scratch writes pass the capacity (the
    stand-in engine raises IndexError past it)."""
    from mixbuild.runtime.generate import Request
    from mixbuild.runtime.sampling import SamplingParams
    from mixbuild.runtime.scheduler import Scheduler

    step, runner = step
    scheduler = Scheduler(step, max_batch=3, capacity=16, step_tokens=8)
    runner.cache = scheduler.cache
    vocab = step.spec.vocab_size

    def request(prompt, n):
        return Request(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), n, vocab, (), None, 0.0)
    runner.context.pause_at = 11             # after the 11th step the first row holds 13 positions
    first = scheduler.submit(request([1, 2, 3], 12))
    while runner.context.calls < 11:
        time.sleep(0.001)
    second = scheduler.submit(request(list(range(10, 18)), 2))
    runner.context.resume.set()
    out = [first.result(10).token_ids, second.result(10).token_ids]
    scheduler.close()
    assert out[0] == list(range(4, 16)) and out[1] == [18, 19]
    widths = [c[INPUT_IDS][1] for c in runner.selected]
    assert widths[11] == 3, "the 8-token prompt was not narrowed to the room left (16 - 13)"
