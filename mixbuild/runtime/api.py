"""The embeddable runtime: `load` a model directory, then `generate`, `stream` or `chat`.

    model = mixbuild.runtime.load("artifacts/tiny-fp32")          # backend="auto"
    for r in model.generate(["def add(a, b):", "import os\n"], max_new_tokens=32):
        print(r.text, r.finish_reason, f"{r.timings.decode_tokens_per_s:.0f} tok/s")

One loaded model serves concurrent calls from several threads: every call has its own
requests, KV cache (borrowed from a pool, so memory is reused across calls) and ONNX Runtime
binding; ONNX Runtime sessions and torch inference are safe to run concurrently, and the
TensorRT runner serializes on its execution context. A seeded request gives the same tokens
whatever runs beside it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mixbuild.contract import (
    ACCURACY_LEVELS,
    Backend,
    Device,
    DType,
    Layout,
)
from mixbuild.errors import MissingDependencyError, UsageError, choice
from mixbuild.model.generation import token_ids
from mixbuild.model.spec import MixtralSpec
from mixbuild.runtime.generate import Request, Result, run_batch
from mixbuild.runtime.opener import ModelDir, ModelKind
from mixbuild.runtime.sampling import GenerationDefaults, SamplingParams
from mixbuild.runtime.scheduler import DEFAULT_MAX_QUEUE, DEFAULT_STEP_TOKENS, Event, Handle
from mixbuild.runtime.tokenizer import Tokenizer


@dataclass(frozen=True)
class LoadOptions:
    backend: Backend = Backend.AUTO
    device: Device = Device.CPU
    max_batch: int = 8
    max_context: int | None = None
    threads: int | None = None
    spinning: bool = True
    layout: Layout | None = None      # torch backend: which KV-cache layout (default concat)
    continuous_batching: bool = True  # serving layout: concurrent calls share one scheduler
    step_tokens: int = DEFAULT_STEP_TOKENS
    max_queue: int = DEFAULT_MAX_QUEUE
    accuracy_level: int = 1           # ort, int4 artifacts: the kernels' activation type

    @classmethod
    def parse(cls, backend: str, device: str, layout: str | None = None, **rest) -> LoadOptions:
        return cls(choice(Backend, backend, "backend"), choice(Device, device, "device"),
                   layout=None if layout is None else Layout.parse(layout), **rest)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("max_batch", "max_context", "threads", "step_tokens", "max_queue"):
            value = getattr(self, name)
            if name in ("max_context", "threads") and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"invalid load option '{name}'", expected="an integer >= 1",
                                 found=repr(value))
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise UsageError("invalid load option 'accuracy_level'",
                             expected=" or ".join(f"{k} ({v})" for k, v in ACCURACY_LEVELS.items()),
                             found=repr(self.accuracy_level))
        if self.layout is not None and self.backend is not Backend.TORCH:
            raise UsageError("layout is a choice of the torch backend only",
                             expected="backend='torch'",
                             found=f"backend='{self.backend.value}', layout='{self.layout.value}'",
                             hint="an artifact's layout is fixed at export (mixbuild export "
                                  "--layout); the ort backend runs the one it has")


def load(path: str | Path, backend: str = "auto", device: str = "cpu", max_batch: int = 8,
         max_context: int | None = None, threads: int | None = None,
         spinning: bool = True, layout: str | None = None, continuous_batching: bool = True,
         step_tokens: int = DEFAULT_STEP_TOKENS, max_queue: int = DEFAULT_MAX_QUEUE,
         accuracy_level: int = 1) -> Model:
    """Open a model directory for generation.

    backend: "ort" (artifact dir), "torch" (checkpoint dir), "trt" (engine dir) or "auto"
    (picked from what the directory holds). max_batch bounds how many prompts run together;
    max_context caps prompt + generated tokens (default: the model's max_position_embeddings).
    threads sets the intra-op threads of ONNX Runtime / torch. A concat-layout artifact feeds
    ONNX Runtime's own present outputs back as past (`FeedStep`; an IOBinding step measured
    slower on CPU, mixbuild/runtime/steps.py). On device="cuda" the ort backend
    keeps the KV cache on the GPU as OrtValues (`OrtValueStep`). spinning (ONNX Runtime's default,
    on) lets its idle threads busy-wait: ~1.5x faster decode of the small fixture on 2 idle cores,
    but ~1.7x slower when other processes or thread pools (torch in the same process) compete
    for the cores; pass spinning=False on shared hosts. A serving-layout artifact runs through
    `ServingStep`; layout="serving" gives the torch backend the same contract
    (`TorchServingStep`). Such a model runs every call through one continuous-batching
    `Scheduler` (mixbuild/runtime/scheduler.py): one KV cache of max_batch slots x max_context
    positions, updated in place; concurrent calls share its batches, a prompt is prefilled in
    chunks of at most step_tokens tokens per iteration, and at most max_queue requests wait
    for a slot (`submit_ids` refuses past that; `generate` waits). continuous_batching=False
    gives each call its own cache and batch instead (the per-call runtime).
    accuracy_level (ort backend, int4 artifacts): the activation type of ONNX Runtime's int4
    kernels (MatMulNBits, QMoE): 1 float32, the contract's W4A16 (the default); 4 int8
    activations, faster, other numerics (validate with `mixbuild validate --accuracy-level 4`).
    """
    options = LoadOptions.parse(backend, device, layout=layout, max_batch=max_batch,
                                max_context=max_context, threads=threads,
                                spinning=spinning, continuous_batching=continuous_batching,
                                step_tokens=step_tokens, max_queue=max_queue,
                                accuracy_level=accuracy_level)
    model_dir = ModelDir.resolve(path)
    path = model_dir.path
    chosen = model_dir.choose(options.backend, options.device, options.accuracy_level)
    step, spec = _OPENERS[model_dir.kind](path, options)
    defaults = GenerationDefaults.read(path, spec.eos_token_id, spec.vocab_size)
    return Model(step, spec, Tokenizer.from_dir(path), defaults, options, chosen.value)


def _open_ort(path: Path, options: LoadOptions):
    from mixbuild.exporter.artifact import Artifact
    from mixbuild.runtime.ort_runner import OrtRunner
    from mixbuild.runtime.steps import FeedStep, OrtValueStep, ServingStep

    artifact = Artifact.open(path)
    # GroupQueryAttention (the serving layout's fast path) runs fp32 on the CPU provider only;
    # its CUDA kernel takes fp16 / bf16
    fast = options.device is Device.CPU or artifact.dtype is not DType.FP32
    runner = OrtRunner(artifact, providers=_ort_providers(options.device), threads=options.threads,
                       spinning=options.spinning, fast_attention=fast,
                       accuracy_level=options.accuracy_level)
    if runner.artifact.layout is Layout.SERVING:
        capacity = _serving_capacity(options, runner.spec)
        return ServingStep(runner, capacity, options.max_batch, options.device.value), runner.spec
    if options.device is Device.CUDA:  # the KV cache stays on the GPU between steps
        return OrtValueStep(runner, "cuda"), runner.spec
    return FeedStep(runner, runner.kv_dtype), runner.spec


SERVING_CAPACITY = 4096   # default cache positions per row of the serving layout


def _serving_capacity(options: LoadOptions, spec: MixtralSpec) -> int:
    """Cache positions per row: max_context, else the model's context up to SERVING_CAPACITY
    (each row's cache is allocated whole: 32k positions of Mixtral-8x7B are 4 GiB in fp16)."""
    return options.max_context or min(spec.max_position_embeddings, SERVING_CAPACITY)


def _ort_providers(device: Device) -> list[str]:
    if device is Device.CPU:
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise MissingDependencyError("onnxruntime-gpu", "gpu", "the ort backend on device='cuda'")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _open_torch(path: Path, options: LoadOptions):
    import torch

    from mixbuild.runtime.torch_runner import TorchRunner

    _torch_threads(options)
    dtype = torch.float32 if options.device is Device.CPU else None
    return _torch_step(TorchRunner.load_model(path, dtype=dtype, device=options.device.value,
                                              layout=options.layout or Layout.CONCAT), options)


def _open_hf_quantized(path: Path, options: LoadOptions):
    """A quantized Hugging Face checkpoint (`mixbuild export --format hf | hf-modelopt`) on the
    torch backend, float32 on the CPU with the dequantization the serving engines apply
    (mixbuild/runtime/hf_quantized.py)."""
    from mixbuild.runtime.hf_quantized import load_model

    _torch_threads(options)
    return _torch_step(load_model(path, layout=options.layout or Layout.CONCAT), options)


def _torch_threads(options: LoadOptions) -> None:
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)


def _torch_step(model, options: LoadOptions):
    """The step over a reference model of either layout: layout="serving" puts it behind the
    scheduler (TorchServingStep), else the per-call FeedStep."""
    from mixbuild.runtime.steps import FeedStep, TorchServingStep
    from mixbuild.runtime.torch_runner import TorchRunner

    if options.layout is Layout.SERVING:
        return TorchServingStep(model, _serving_capacity(options, model.spec), options.max_batch), model.spec
    return FeedStep(TorchRunner(model)), model.spec


def _open_trt(path: Path, options: LoadOptions):
    from mixbuild.runtime.steps import FeedStep
    from mixbuild.runtime.trt_runner import TrtRunner

    runner = TrtRunner(path)  # checks the manifest and the TensorRT import first
    if runner.manifest.layout is Layout.SERVING:
        from mixbuild.runtime.trt_runner import TrtServingStep

        return TrtServingStep(runner, options.max_batch), runner.spec
    return FeedStep(runner, runner.kv_dtype), runner.spec


_OPENERS = {ModelKind.ARTIFACT: _open_ort, ModelKind.CHECKPOINT: _open_torch,
            ModelKind.HF_QUANTIZED: _open_hf_quantized, ModelKind.ENGINE: _open_trt}


class _CachePool:
    """KV caches reused across calls; concurrent calls each borrow their own."""

    def __init__(self, factory) -> None:
        self.factory = factory
        self.free: list = []
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self):
        with self.lock:
            cache = self.free.pop() if self.free else self.factory()
        try:
            yield cache
        finally:
            with self.lock:
                self.free.append(cache)


class Model:
    """A loaded model: text and token-id generation, streaming, chat."""

    def __init__(self, step, spec: MixtralSpec, tokenizer: Tokenizer | None,
                 defaults: GenerationDefaults | None = None, options: LoadOptions | None = None,
                 backend: str = "custom") -> None:
        self.step = step
        self.spec = spec
        self.tokenizer = tokenizer
        self.defaults = defaults or GenerationDefaults(eos_token_ids=token_ids(spec.eos_token_id))
        self.options = options or LoadOptions()
        self.backend = backend
        self.caches = _CachePool(step.new_cache)
        self._scheduler = None
        self._scheduler_lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_runner(cls, runner, tokenizer: Tokenizer | None = None,
                    defaults: GenerationDefaults | None = None, max_batch: int = 8,
                    max_context: int | None = None) -> Model:
        """Generation over any object with the Runner contract (`spec`, `infer(feeds)`)."""
        from mixbuild.runtime.steps import FeedStep

        options = LoadOptions(max_batch=max_batch, max_context=max_context)
        return cls(FeedStep(runner), runner.spec, tokenizer, defaults, options,
                   getattr(runner, "name", "custom"))

    @property
    def context_limit(self) -> int:
        limit = self.spec.max_position_embeddings
        if self.options.max_context:
            limit = min(limit, self.options.max_context)
        capacity = getattr(self.step, "capacity", None)   # the serving layout's cache
        return min(limit, capacity) if capacity else limit

    @property
    def continuous_batching(self) -> bool:
        """Whether calls run through the shared scheduler (a serving-layout step)."""
        return self.step.layout is Layout.SERVING and self.options.continuous_batching

    @property
    def scheduler(self):
        """The continuous-batching Scheduler (started on first use); None for a step without
        the serving contract, or with continuous_batching=False."""
        if not self.continuous_batching:
            return None
        with self._scheduler_lock:
            if self._closed:
                from mixbuild.runtime.scheduler import Overloaded

                raise Overloaded("the model is closed and takes no new requests",
                                 reason=Overloaded.SHUTTING_DOWN,
                                 hint="load the model again to generate")
            if self._scheduler is None:
                from mixbuild.runtime.scheduler import Scheduler

                self._scheduler = Scheduler(self.step, max_batch=self.options.max_batch,
                                            capacity=self.context_limit,
                                            step_tokens=min(self.options.step_tokens,
                                                            getattr(self.step, "max_step_tokens",
                                                                    self.options.step_tokens)),
                                            max_queue=self.options.max_queue)
            return self._scheduler

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the scheduler (finishing what runs, with drain); later calls are refused
        (`Overloaded`). A no-op for a model without a scheduler."""
        with self._scheduler_lock:
            scheduler, self._scheduler = self._scheduler, None
            self._closed = self.continuous_batching
        if scheduler is not None:
            scheduler.close(drain=drain, timeout=timeout)

    def sampling(self, sampling: SamplingParams | None = None, **overrides) -> SamplingParams:
        """The sampling a call uses: `sampling` (a whole SamplingParams) or else the artifact's
        defaults (generation_config.json), with keyword overrides applied on top."""
        base = sampling if sampling is not None else self.defaults.sampling
        return base.replace(**overrides) if overrides else base

    # ----------------------------------------------------------------- text in, text out
    def generate(self, prompts: str | Sequence[str], sampling=None, **overrides) -> list[Result]:
        """Generate for one prompt or a list; returns one Result per prompt, in order."""
        return self.generate_ids(self._encode_all(prompts), sampling, **overrides)

    def stream(self, prompt: str, sampling: SamplingParams | None = None, **overrides) -> TextStream:
        """Iterate over text pieces as tokens arrive; `.result` holds the Result afterwards."""
        return self.stream_ids(self._encode_all([prompt])[0], sampling, **overrides)

    def chat(self, messages: list[dict[str, str]], sampling=None, **overrides) -> Result:
        """Answer a conversation rendered with the tokenizer's chat template."""
        return self.generate_ids([self._need_tokenizer().encode_chat(messages)], sampling,
                                 **overrides)[0]

    def stream_chat(self, messages: list[dict[str, str]], sampling=None, **overrides) -> TextStream:
        return self.stream_ids(self._need_tokenizer().encode_chat(messages), sampling, **overrides)

    # ----------------------------------------------------------------- token ids
    def generate_ids(self, prompts: Sequence[Sequence[int]], sampling=None,
                     **overrides) -> list[Result]:
        """`sampling` is one SamplingParams for every prompt or a list with one per prompt."""
        requests = self._requests(prompts, sampling, overrides)
        scheduler = self.scheduler
        if scheduler is None:
            for _ in self._events(requests):
                pass
            return [r.result() for r in requests]
        handles: list[Handle] = []
        try:
            for request in requests:
                handles.append(scheduler.submit(request, block=True))
            return [h.result() for h in handles]
        finally:            # an error or an interrupt: what is still running stops
            for h in handles:
                h.cancel()

    def stream_ids(self, prompt: Sequence[int], sampling=None, **overrides) -> TextStream:
        requests = self._requests([prompt], sampling, overrides)
        scheduler = self.scheduler
        if scheduler is None:
            return TextStream(self._events(requests), requests[0])
        return TextStream(_handle_events(scheduler.submit(requests[0], block=True)), requests[0])

    def submit_ids(self, prompt: Sequence[int], sampling=None, *, logprobs: int | None = None,
                   on_event: Callable[[Event], None] | None = None, **overrides) -> Handle:
        """Queue one request on the scheduler and return at once. Its Handle yields events
        (text pieces, token ids, and with `logprobs` = k the token's log-probability and the k
        most likely alternatives), or they go to `on_event`, called on the scheduler's thread.
        Raises `Overloaded` when the queue is full. Needs continuous batching: a
        serving-layout model."""
        scheduler = self.scheduler
        if scheduler is None:
            found = ("continuous_batching=False" if self.step.layout is Layout.SERVING
                     else f"a {self.backend} model with the concat KV-cache layout")
            raise UsageError("submit_ids needs a model with continuous batching", found=found,
                             hint="export with `mixbuild export --layout serving`, or load a "
                                  "checkpoint with layout='serving'")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= self.spec.vocab_size):
            raise UsageError("invalid logprobs",
                             expected=f"an integer in [0, {self.spec.vocab_size}]",
                             found=repr(logprobs))
        request = self._requests([prompt], sampling, overrides)[0]
        return scheduler.submit(request, logprobs=logprobs, on_event=on_event)

    # ----------------------------------------------------------------- internals
    def _events(self, requests: list[Request]) -> Iterator[tuple[int, str]]:
        size = self.options.max_batch
        with self.caches.borrow() as cache:
            for first in range(0, len(requests), size):
                for index, piece in run_batch(self.step, cache, requests[first:first + size],
                                              self.defaults.pad_token_id, first):
                    yield first + index, piece

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise UsageError("this model directory has no tokenizer.json, so it cannot take text",
                             hint="pass token ids to generate_ids(), or add tokenizer.json")
        return self.tokenizer

    def _encode_all(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise UsageError("prompts must be a string or a list of strings",
                             found=type(prompts).__name__)
        tokenizer = self._need_tokenizer()
        return [tokenizer.encode(p) for p in prompts]

    def _requests(self, prompts, sampling, overrides) -> list[Request]:
        start = time.perf_counter()
        prompts = self._check_prompts(prompts)
        params = self._params_for(len(prompts), sampling, overrides)
        for p in params:
            p.check_vocab(self.spec.vocab_size)
        eos = self.defaults.eos_token_ids
        requests = [Request(p, s, min(s.max_new_tokens, self.context_limit - len(p)),
                            self.spec.vocab_size, eos, self.tokenizer, start)
                    for p, s in zip(prompts, params)]
        for index, request in enumerate(requests):
            request.index = index
        return requests

    def _params_for(self, count: int, sampling, overrides) -> list[SamplingParams]:
        if isinstance(sampling, (list, tuple)):
            if len(sampling) != count:
                raise UsageError("one SamplingParams per prompt was expected",
                                 expected=f"{count} entries", found=f"{len(sampling)}")
            return [self.sampling(s, **overrides) for s in sampling]
        return [self.sampling(sampling, **overrides)] * count

    def _check_prompts(self, prompts) -> list[list[int]]:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise UsageError("no prompts were given", expected="a non-empty list of prompts",
                             found=repr(prompts)[:100])
        checked = [_token_list(p, i, self.spec.vocab_size) for i, p in enumerate(prompts)]
        limit = self.context_limit
        for i, p in enumerate(checked):
            if len(p) >= limit:
                source = "max_context" if limit == self.options.max_context else "max_position_embeddings"
                raise UsageError(f"prompt {i} is too long: {len(p)} tokens",
                                 expected=f"fewer than {limit} tokens, the context limit "
                                          f"({source}), to leave room for one new token",
                                 found=f"{len(p)} tokens", hint="shorten the prompt")
        return checked


def _token_list(prompt, index: int, vocab: int) -> list[int]:
    """One prompt of token ids -> a list of ints. Only integers count (Python ints, numpy
    integers): a float, a bool or a string is refused rather than truncated by int()."""
    import numpy as np

    if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__iter__"):
        raise UsageError(f"prompt {index} is not a list of token ids", found=repr(prompt)[:100],
                         hint="pass text to generate(), token ids to generate_ids()")
    ids = list(prompt)
    if not ids:
        raise UsageError(f"prompt {index} is empty", expected="at least one token")
    for position, t in enumerate(ids):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise UsageError(f"prompt {index} is not a list of token ids: position {position} "
                             f"holds {t!r} ({type(t).__name__})",
                             expected=f"integers in [0, {vocab})", found=repr(prompt)[:100],
                             hint="token ids are integers; convert with int() only if the "
                                  "values really are ids")
    for position, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise UsageError(f"prompt {index} holds token id {int(t)} at position {position}, "
                             "outside the vocabulary",
                             expected=f"ids in [0, {vocab}) (vocab_size {vocab})",
                             found=f"{int(t)}; the prompt's ids range from {min(ids)} to {max(ids)}")
    return [int(t) for t in ids]


def _handle_events(handle: Handle) -> Iterator[tuple[int, str]]:
    """A scheduled request's events as the per-call loop's (index, piece) pairs; closing the
    iterator cancels the request."""
    try:
        for event in handle.events():
            if event.error is not None:
                raise event.error
            if event.text:
                yield 0, event.text
    finally:
        handle.cancel()


class TextStream:
    """Iterator over text pieces of one streamed request; `result` is set when it ends."""

    def __init__(self, events: Iterator[tuple[int, str]], request: Request) -> None:
        self._events = events
        self._request = request
        self.result: Result | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            _, piece = next(self._events)
            return piece
        except StopIteration:
            self.result = self._request.result()
            raise

    def close(self) -> None:
        """Stop generating early (the KV cache goes back to the pool); `result` stays None."""
        self._events.close()
