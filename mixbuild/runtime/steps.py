"""One forward step of the model over the runtime's KV cache, per backend family.

    step(input_ids [B, S], attention_mask [B, P+S], position_ids [B, S], cache) -> logits [B, V]

returns the logits of the last position of each row and leaves the cache holding P+S positions.

- `FeedStep`: any `Runner` (ONNX Runtime's plain session.run, torch, TensorRT, a wrapped
  runner): feeds past as arrays and adopts the present arrays the runner returns
  (`AdoptedCache`). With ONNX Runtime on CPU this is zero-copy too: numpy wraps the present
  tensors ORT's Concat wrote (from ORT's arena), and they go back in as past without a copy.

  An IOBinding step over preallocated ping-pong buffers was measured against it on CPU (ORT
  1.32, the trained fixture and a 338M-parameter random Mixtral, 1 thread): the session run
  was equal (prebound ~3% faster in isolation), but binding 2 x layers cache tensors per step
  cost ~0.09-0.12 ms of Python, more than the allocation it saved: end to end FeedStep was ~8%
  faster on the fixture (B=1: 1494 vs 1364 tokens/s) and equal on the 338M model (B=8: 82.2
  vs 82.6 tokens/s), also at 1000 positions of context. That step and its cache were removed.
- `OrtValueStep`: ONNX Runtime with the cache kept as OrtValues on the session's device: the
  present outputs ORT allocates there are bound as the next step's past, and only the logits
  come back to the host. This is what `load(..., device="cuda")` uses, so the KV cache never
  crosses PCIe; the same class runs (and is tested) on CPU, but the CUDA path is unverified
  here (no GPU).

The serving layout (docs/contract.md) has its own two steps, picked by `load` from the
artifact's manifest (ort) or layout="serving" (torch): `ServingStep` binds one StaticCache as
both the graph's cache input and output (ONNX Runtime updates it in place; nothing is copied
per step) and `TorchServingStep` writes a TorchStaticCache in place. Both take right-padded
rows with per-row lengths (`run`), or the generation loop's left-padded call.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from mixbuild.contract import (
    ATTENTION_MASK,
    CACHE_LENGTHS,
    INPUT_IDS,
    INPUT_LENGTHS,
    LOGITS,
    POSITION_IDS,
    Layout,
)
from mixbuild.runtime.kv_cache import AdoptedCache, OrtValueCache, StaticCache
from mixbuild.runtime.runner import Runner


class Step(Protocol):
    """One forward step over a KV cache. `layout` says which contract it has: CONCAT steps are
    called with left-padded rows (`__call__`); SERVING steps also take ragged rows with per-row
    counts (`run`), which the continuous-batching scheduler needs."""

    layout: Layout

    def new_cache(self): ...

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 position_ids: np.ndarray, cache) -> np.ndarray: ...


def _token_feeds(input_ids, attention_mask, position_ids) -> dict[str, np.ndarray]:
    return {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, POSITION_IDS: position_ids}


class FeedStep:
    """Any runner behind the Runner contract; the cache adopts what the runner returns."""

    layout = Layout.CONCAT

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


def _bind(bind, name: str, array: np.ndarray) -> None:
    bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


class OrtValueStep:
    """ONNX Runtime with the KV cache resident on `device` ("cpu" or "cuda") as OrtValues."""

    layout = Layout.CONCAT

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


class _ServingLayout:
    """What both serving-layout steps share: the generation loop's left-padded call."""

    layout = Layout.SERVING

    def __call__(self, input_ids, attention_mask, position_ids, cache) -> np.ndarray:
        """Left-padded rows (the concat layout's convention) -> right-aligned rows with per-row
        counts, then `run`."""
        seq = input_ids.shape[1]
        counts = attention_mask[:, -seq:].sum(axis=1).astype(np.int64)
        return self.run(right_align(input_ids, counts), right_align(position_ids, counts), counts,
                        cache)


class ServingStep(_ServingLayout):
    """ONNX Runtime on a serving-layout artifact: the cache buffers are bound as both the input
    and the output of the graph (the update happens in place), once per batch size; a step
    binds only the token inputs and the logits of each row's last token.

    The generation loop passes left-padded rows (the concat layout's convention); the step
    right-aligns each row's new tokens (input_lengths) and keeps the per-row cache lengths, so
    rows of one batch may be at different positions.

    device="cuda" (ONNX Runtime's CUDA provider) keeps the cache on the GPU, as torch CUDA
    tensors (TorchStaticCache) whose addresses are bound with device type "cuda": still one
    buffer per layer updated in place, and only the token inputs and the last-token logits
    cross PCIe. Unverified here (no GPU); the CPU path is the one tested."""

    def __init__(self, runner, capacity: int, max_batch: int, device: str = "cpu") -> None:
        self.runner = runner                          # an OrtRunner (its .kernels say what runs)
        self.session = runner.session
        self.spec = runner.spec
        self.kv_dtype = runner.kv_dtype
        self.capacity, self.max_batch = capacity, max_batch
        self.device = device
        # GroupQueryAttention (the fast path) takes a multi-token step over a filled cache
        # only one row at a time (mixbuild/runtime/ort_attention.py)
        self.one_row_chunks = bool(getattr(runner, "fast_attention", 0))

    def new_cache(self, capacity: int | None = None, max_batch: int | None = None) -> StaticCache:
        capacity, max_batch = capacity or self.capacity, max_batch or self.max_batch
        if self.device == "cpu":
            return StaticCache(self.spec, capacity, max_batch, self.kv_dtype)
        from mixbuild.contract import DType
        from mixbuild.runtime.kv_cache import TorchStaticCache

        dtype = DType.parse(np.dtype(self.kv_dtype).name).torch
        return TorchStaticCache(self.spec, capacity, max_batch, dtype, self.device)

    def _bind_cache(self, cache: StaticCache, rows: slice):
        """The IOBinding with rows `rows` of every cache buffer bound as both the input and the
        output (a contiguous block of each buffer). Rebound only when the rows change."""
        if cache.binding is None:
            cache.binding = self.session.io_binding()
        if cache.bound_batch != (rows.start, rows.stop):
            io = cache.binding
            shape = [rows.stop - rows.start, *cache.shape()[1:]]
            dtype = np.dtype(self.kv_dtype)
            for (name, updated), buffer in zip(cache.names, cache.buffers):
                row = buffer[rows.start]
                address = row.ctypes.data if isinstance(row, np.ndarray) else row.data_ptr()
                io.bind_input(name, self.device, 0, dtype, shape, address)
                io.bind_output(updated, self.device, 0, dtype, shape, address)
            cache.bound_batch = (rows.start, rows.stop)
        return cache.binding

    def run(self, ids: np.ndarray, positions: np.ndarray, counts: np.ndarray,
            cache: StaticCache) -> np.ndarray:
        """One step on right-padded rows: row b feeds ids[b, :counts[b]] at positions
        positions[b, :counts[b]], written after its cache.lengths[b] valid positions."""
        batch = ids.shape[0]
        cache.check_room(batch, ids.shape[1])
        logits = np.empty((batch, self.spec.vocab_size), np.float32)
        chunks = [r for r in range(batch) if counts[r] > 1]
        if self.one_row_chunks and batch > 1 and chunks and cache.lengths[:batch].any():
            # one decode call for the batch (a prefilling row idles: it writes only scratch at
            # its first free position, which its own call then overwrites), then the prefilling
            # rows: adjacent rows whose caches are empty (new requests: the scheduler appends
            # them) in one call, the kernel's prompt mode; a later chunk of a prompt alone
            single = np.where(counts == 1, counts, 0)
            if single.any():
                self._call(ids[:, :1], positions[:, :1], single, cache, slice(0, batch), logits)
            for rows in _prefill_groups(chunks, cache.lengths):
                n = int(counts[rows].max())
                self._call(ids[rows, :n], positions[rows, :n], counts[rows], cache, rows,
                           logits[rows])
        else:
            self._call(ids, positions, counts, cache, slice(0, batch), logits)
        cache.lengths[:batch] += counts
        return logits

    def _call(self, ids, positions, counts, cache: StaticCache, rows: slice, logits) -> None:
        io = self._bind_cache(cache, rows)
        io.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(ids, np.int64))
        io.bind_cpu_input(POSITION_IDS, np.ascontiguousarray(positions, np.int64))
        io.bind_cpu_input(CACHE_LENGTHS, cache.lengths[rows].copy())
        io.bind_cpu_input(INPUT_LENGTHS, np.ascontiguousarray(counts, np.int64))
        _bind(io.bind_output, LOGITS, logits)
        self.session.run_with_iobinding(io)


def _prefill_groups(chunks: list[int], lengths: np.ndarray) -> list[slice]:
    """The calls for the rows `chunks` (ascending) of a mixed step: runs of adjacent rows with
    empty caches share one call, any other row has its own."""
    groups: list[slice] = []
    for r in chunks:
        last = groups[-1] if groups else None
        if (last is not None and last.stop == r and lengths[r] == 0
                and lengths[last.start] == 0):
            groups[-1] = slice(last.start, r + 1)
        else:
            groups.append(slice(r, r + 1))
    return groups


def right_align(left_padded: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Rows whose last counts[b] entries are valid -> rows whose first counts[b] entries are."""
    seq = left_padded.shape[1]
    out = np.zeros_like(left_padded)
    for row, n in enumerate(counts):
        out[row, :n] = left_padded[row, seq - n:]
    return out


class TorchServingStep(_ServingLayout):
    """The serving layout on the torch backend: ServingMixtralModel writing a TorchStaticCache
    (allocated once, on the model's device) in place, with per-row lengths, as ServingStep does
    on ONNX Runtime. No host synchronisation inside a step, so its CUDA path can be captured in
    a CUDA graph (not done yet; unverified without a GPU)."""

    def __init__(self, model, capacity: int, max_batch: int) -> None:  # model: ServingMixtralModel
        self.model = model.write_in_place()
        self.spec = model.spec
        self.capacity, self.max_batch = capacity, max_batch
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype

    def new_cache(self, capacity: int | None = None, max_batch: int | None = None):
        from mixbuild.runtime.kv_cache import TorchStaticCache

        return TorchStaticCache(self.spec, capacity or self.capacity, max_batch or self.max_batch,
                                self.dtype, self.device)

    def run(self, ids: np.ndarray, positions: np.ndarray, counts: np.ndarray, cache) -> np.ndarray:
        import torch

        from mixbuild.tensors import to_numpy

        batch = ids.shape[0]
        cache.check_room(batch, ids.shape[1])

        def tensor(a):
            return torch.from_numpy(np.ascontiguousarray(a, np.int64)).to(self.device)
        with torch.inference_mode():
            logits = self.model(tensor(ids), tensor(positions), tensor(cache.lengths[:batch]),
                                tensor(counts), *(b[:batch] for b in cache.buffers))[0]
        cache.lengths[:batch] += counts
        return to_numpy(logits)
