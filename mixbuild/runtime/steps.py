"""One forward step of the model over the runtime's KV cache, per backend family.

    step(input_ids [B, S], attention_mask [B, P+S], position_ids [B, S], cache) -> logits [B, V]

returns the logits of the last position of each row and leaves the cache holding P+S positions.

- `BoundOrtStep`: ONNX Runtime through IOBinding. Past and present are bound as raw pointers
  into the ping-pong buffers of `KVCache` and the logits into a reusable buffer, so a decode
  step allocates nothing and copies nothing outside the graph.
- `FeedStep`: any `Runner` (ONNX Runtime's plain session.run, torch, TensorRT, a wrapped
  runner): feeds past as arrays and adopts the present arrays the runner returns
  (`AdoptedCache`). With ONNX Runtime on CPU this is zero-copy too: numpy wraps the present
  tensors ORT's Concat wrote (from ORT's arena), and they go back in as past without a copy.

Which is faster on CPU (ORT 1.32, measured on the trained fixture and a 338M-parameter random
Mixtral, 1 thread): the session run itself is equal (prebound IOBinding ~3% faster in
isolation), but binding 2 x layers cache tensors per step costs ~0.09-0.12 ms of Python, more
than the allocation it saves: end to end FeedStep was ~8% faster on the fixture (B=1: 1494 vs
1364 tokens/s) and equal on the 338M model (B=8: 82.2 vs 82.6 tokens/s), also at 1000
positions of context. So `load` uses FeedStep by default and BoundOrtStep with
io_binding=True on CPU.
- `OrtValueStep`: ONNX Runtime with the cache kept as OrtValues on the session's device: the
  present outputs ORT allocates there are bound as the next step's past, and only the logits
  come back to the host. This is what `load(..., device="cuda")` uses, so the KV cache never
  crosses PCIe; the same class runs (and is tested) on CPU, but the CUDA path is unverified
  here (no GPU).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from mixbuild.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS
from mixbuild.runtime.kv_cache import AdoptedCache, KVCache, OrtValueCache
from mixbuild.runtime.runner import Runner


class Step(Protocol):
    def new_cache(self): ...

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 position_ids: np.ndarray, cache) -> np.ndarray: ...


def _token_feeds(input_ids, attention_mask, position_ids) -> dict[str, np.ndarray]:
    return {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, POSITION_IDS: position_ids}


class FeedStep:
    """Any runner behind the Runner contract; the cache adopts what the runner returns."""

    def __init__(self, runner: Runner, kv_dtype=np.float32) -> None:
        self.runner = runner
        self.spec = runner.spec
        self.kv_dtype = kv_dtype

    def new_cache(self) -> AdoptedCache:
        return AdoptedCache(self.spec, self.kv_dtype)

    def __call__(self, input_ids, attention_mask, position_ids, cache: AdoptedCache) -> np.ndarray:
        feeds = _token_feeds(input_ids, attention_mask, position_ids)
        for index, (past, _) in enumerate(cache.names):
            feeds[past] = cache.past(index)
        outputs = self.runner.infer(feeds)
        cache.adopt(outputs, input_ids.shape[1])
        return outputs[LOGITS][:, -1]


class BoundOrtStep:
    """ONNX Runtime with every cache tensor and the logits bound to preallocated memory."""

    def __init__(self, runner) -> None:  # runner: OrtRunner
        self.session = runner.session
        self.spec = runner.spec
        self.kv_dtype = runner.kv_dtype

    def new_cache(self) -> KVCache:
        return KVCache(self.spec, self.kv_dtype)

    def __call__(self, input_ids, attention_mask, position_ids, cache: KVCache) -> np.ndarray:
        batch, seq = input_ids.shape
        io = self.session.io_binding()  # per call: concurrent requests never share bindings
        for name, value in _token_feeds(input_ids, attention_mask, position_ids).items():
            io.bind_cpu_input(name, value)
        rows, past_shape, present_shape = cache.bindings(seq)
        dtype = cache.dtype
        for past, present, src, dst in rows:
            io.bind_input(past, "cpu", 0, dtype, past_shape, src)
            io.bind_output(present, "cpu", 0, dtype, present_shape, dst)
        logits = cache.logits_buffer((batch, seq, self.spec.vocab_size))
        _bind(io.bind_output, LOGITS, logits)
        self.session.run_with_iobinding(io)
        cache.advance(seq)
        return logits[:, -1]


def _bind(bind, name: str, array: np.ndarray) -> None:
    bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


class OrtValueStep:
    """ONNX Runtime with the KV cache resident on `device` ("cpu" or "cuda") as OrtValues."""

    def __init__(self, runner, device: str = "cuda") -> None:  # runner: OrtRunner
        self.session = runner.session
        self.spec = runner.spec
        self.kv_dtype = runner.kv_dtype
        self.device = device

    def new_cache(self) -> OrtValueCache:
        return OrtValueCache(self.spec, self.kv_dtype, self.device)

    def __call__(self, input_ids, attention_mask, position_ids, cache: OrtValueCache) -> np.ndarray:
        io = self.session.io_binding()  # per call: concurrent requests never share bindings
        for name, value in _token_feeds(input_ids, attention_mask, position_ids).items():
            io.bind_cpu_input(name, value)
        for (past, present), value in zip(cache.names, cache.values):
            io.bind_ortvalue_input(past, value)
            io.bind_output(present, self.device, 0)
        io.bind_output(LOGITS, "cpu", 0)
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()  # in binding order: the presents, then the logits
        cache.adopt(list(outputs)[:-1], input_ids.shape[1])
        return outputs[len(cache.names)].numpy()[:, -1]
