"""Continuous batching: an iteration-level scheduler over one serving-layout step.

One loop thread owns a StaticCache of max_batch slots (rows) x capacity positions and the
model step. At every iteration it

1. frees the slots of cancelled requests (and of requests that finished last iteration);
2. admits waiting requests into free slots, oldest first (a burst still arriving is waited
   for, a few milliseconds at most, so that it prefills in one step);
3. builds one ragged step: every decoding request feeds its last token, and the prefilling
   requests feed chunks of their prompts within a per-step token budget (`step_tokens`), so a
   long prompt is prefilled over several iterations instead of stalling the running decodes;
4. runs the step (rows of different lengths, right-padded, with per-row counts: the serving
   contract of docs/contract.md), samples each request's next token with its own sampling
   parameters and seed, and delivers the events (text piece, token id, log-probabilities).

Running requests always occupy rows 0..n-1: when one leaves, the last row's valid cache
positions move into its slot (one copy of one row per finished request, never per step).
Requests are refused past `max_queue` waiting ones (`Overloaded`) instead of piling up.

No HTTP here: `mixbuild.serve` puts an OpenAI-compatible API in front of it, and services can
embed it directly (`Model.submit_ids`). The same loop drives every step with the serving
contract: ONNX Runtime (`ServingStep`), torch (`TorchServingStep`).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from mixbuild.errors import ArtifactError, MixbuildError
from mixbuild.runtime.generate import FinishReason, Request, Result, check_logits
from mixbuild.runtime.metrics import ServingMetrics

# tokens one iteration feeds at most (decodes first, then prompt chunks): large enough that a
# burst of prompts prefills in one step (on the ~338M model at 16 clients, 2 CPU threads:
# 256 -> ITL p99 191 ms, 1024 -> 48 ms, 2048 -> 67 ms; benchmarks/serving.py), small enough
# that a long prompt does not stall the running decodes for long
DEFAULT_STEP_TOKENS = 1024
DEFAULT_MAX_QUEUE = 256
# a burst of requests is admitted together: the scheduler waits while arrivals keep coming
# within ADMIT_WINDOW_S of each other, at most ADMIT_MAX_S (the TTFT it may add)
ADMIT_WINDOW_S = 0.003
ADMIT_MAX_S = 0.02


class Overloaded(MixbuildError):
    """The scheduler takes no more requests now: `reason` is QUEUE_FULL (try again later) or
    SHUTTING_DOWN (it is closing)."""

    QUEUE_FULL = "queue_full"
    SHUTTING_DOWN = "shutting_down"

    def __init__(self, what: str, *, reason: str = QUEUE_FULL, **rest) -> None:
        super().__init__(what, **rest)
        self.reason = reason


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a generated token under the model's raw distribution (softmax of
    the logits, before temperature or filters, as OpenAI's API reports it), and the top ones."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Event:
    """One thing that happened to a request: a token (with the text it released, possibly
    empty while a stop string or a multi-byte character is pending), or its end (`result`
    set), or a failure (`error` set)."""

    text: str = ""
    token_id: int | None = None
    logprob: TokenLogprob | None = None
    result: Result | None = None
    error: MixbuildError | None = None

    @property
    def last(self) -> bool:
        return self.result is not None or self.error is not None


class Handle:
    """A submitted request: iterate its events, wait for its result, or cancel it."""

    def __init__(self, request: Request, logprobs: int | None,
                 on_event: Callable[[Event], None] | None) -> None:
        self.id = next(_ids)
        self.request = request
        self.logprobs = logprobs
        self._queue: queue.SimpleQueue | None = None if on_event else queue.SimpleQueue()
        self._deliver = on_event or self._queue.put
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.outcome: Result | MixbuildError | None = None

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the start of the next iteration."""
        self.cancelled.set()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The events as they come, ending with the last one (only without `on_event`)."""
        if self._queue is None:
            raise RuntimeError("this request delivers its events to its on_event callback")
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if event.last:
                return

    def result(self, timeout: float | None = None) -> Result:
        """Wait for the end; the Result, or the error that ended the request, raised."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if isinstance(self.outcome, MixbuildError):
            raise self.outcome
        return self.outcome

    def _emit(self, event: Event) -> None:
        """Deliver `event` (on the scheduler's thread). A consumer whose callback raises is
        cancelled; the loop goes on for everyone else."""
        if event.last:
            self.outcome = event.result if event.error is None else event.error
        try:
            self._deliver(event)
        except Exception:                 # the consumer's failure, not the model's
            self.cancel()
        finally:
            if event.last:
                self.done.set()


_ids = itertools.count()


class _Slot:
    """A running request: how much of its prompt is in the cache, the token to feed next."""

    def __init__(self, handle: Handle) -> None:
        self.handle = handle
        self.request = handle.request
        self.fed = 0                     # prompt tokens already in the cache
        self.next_token: int | None = None
        self.last_at = 0.0

    @property
    def decoding(self) -> bool:
        return self.next_token is not None


class Scheduler:
    """The loop thread, its slots and its queue. `submit` from any thread."""

    def __init__(self, step, *, max_batch: int, capacity: int, step_tokens: int = DEFAULT_STEP_TOKENS,
                 max_queue: int = DEFAULT_MAX_QUEUE, admit_window_s: float = ADMIT_WINDOW_S,
                 admit_max_s: float = ADMIT_MAX_S, name: str = "mixbuild-scheduler") -> None:
        if step_tokens < 1 or max_queue < 1:
            raise ValueError("step_tokens and max_queue must be >= 1")
        self.step = step
        self.max_batch, self.capacity = max_batch, capacity
        self.step_tokens, self.max_queue = step_tokens, max_queue
        self.admit_window_s, self.admit_max_s = admit_window_s, admit_max_s
        self._last_arrival = 0.0
        # headroom: a ragged step writes scratch K/V up to its width past a row's valid length
        # (see _plan); a step whose capacity is fixed (a TensorRT engine) returns its own
        self.cache = step.new_cache(capacity=capacity + step_tokens, max_batch=max_batch)
        if self.cache.capacity < capacity:
            raise ValueError(f"the step's cache holds {self.cache.capacity} positions, "
                             f"fewer than the context of {capacity}")
        self.metrics = ServingMetrics(max_batch)
        self._waiting: deque[Handle] = deque()
        self._slots: list[_Slot] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- any thread
    def submit(self, request: Request, *, logprobs: int | None = None,
               on_event: Callable[[Event], None] | None = None, block: bool = False) -> Handle:
        """Queue `request`. Past max_queue waiting requests: `Overloaded`, or with block=True
        wait for room (what the embedded Model API does)."""
        if request.budget < 1:
            raise MixbuildError("the request has no room to generate a token")
        handle = Handle(request, logprobs, on_event)
        with self._cond:
            while True:
                if self._closing:
                    raise Overloaded("the server is shutting down and takes no new requests",
                                     reason=Overloaded.SHUTTING_DOWN,
                                     hint="retry against a running server")
                # a free slot takes a request at the next iteration: it does not count as queued
                free = self.max_batch - len(self._slots)
                if len(self._waiting) < self.max_queue + free:
                    break
                if not block:
                    with self.metrics.lock:
                        self.metrics.refused += 1
                    raise Overloaded("the request queue is full",
                                     expected=f"at most {self.max_queue} waiting requests "
                                              "beyond the free slots",
                                     found=f"{len(self._waiting)} waiting, "
                                           f"{len(self._slots)} of {self.max_batch} slots running",
                                     hint="retry later, or start the server with a larger "
                                          "--max-queue / --max-batch")
                self._cond.wait()
            self._waiting.append(handle)
            self._last_arrival = time.perf_counter()
            self._gauges()
            self._cond.notify_all()
        return handle

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with drain, finish the running and waiting ones first, else
        cancel them. Returns when the loop thread has ended (or `timeout` passed)."""
        with self._cond:
            self._closing = True
            if not drain:
                for handle in [*self._waiting, *(s.handle for s in self._slots)]:
                    handle.cancel()
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._waiting and not self._slots

    # ----------------------------------------------------------------- loop thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._slots and not self._closing:
                    self._cond.wait()
                if self._closing and not self._waiting and not self._slots:
                    return
                self._gather_burst()
                self._drop_cancelled()
                self._admit()
                self._gauges()
                self._cond.notify_all()       # blocked submitters: the queue has room
            if self._slots:
                self._iterate()

    def _gather_burst(self) -> None:
        """Before admitting new requests, let a burst finish arriving: wait while requests
        keep coming (each within `admit_window_s` of the last, at most `admit_max_s` in all)
        and free slots remain. Requests of a burst then prefill in one step instead of one step
        each, and the decodes already running are interrupted by one prefill, not several
        (clients of one service tend to arrive together). Called with the lock held."""
        if not self._waiting or self._closing or self.admit_window_s <= 0:
            return
        start = time.perf_counter()
        while len(self._waiting) < self.max_batch - len(self._slots):
            now = time.perf_counter()
            quiet = self._last_arrival + self.admit_window_s - now
            left = start + self.admit_max_s - now
            if quiet <= 0 or left <= 0:
                return
            self._cond.wait(min(quiet, left))

    def _gauges(self) -> None:
        with self.metrics.lock:
            self.metrics.queue_depth = len(self._waiting)
            self.metrics.running = len(self._slots)

    def _drop_cancelled(self) -> None:
        for handle in [h for h in self._waiting if h.cancelled.is_set()]:
            self._waiting.remove(handle)
            self._end(handle, FinishReason.CANCELLED)
        gone = [i for i, s in enumerate(self._slots) if s.handle.cancelled.is_set()]
        for i in reversed(gone):
            slot = self._slots[i]
            self._free(i)
            self._end(slot.handle, FinishReason.CANCELLED)

    def _admit(self) -> None:
        while self._waiting and len(self._slots) < self.max_batch:
            handle = self._waiting.popleft()
            row = len(self._slots)
            self.cache.lengths[row] = 0
            self._slots.append(_Slot(handle))

    def _free(self, row: int) -> None:
        """Release slot `row`: the last running row moves into it (its valid positions only)."""
        last = len(self._slots) - 1
        if row != last:
            self.cache.move_row(last, row)
            self._slots[row] = self._slots[last]
        self._slots.pop()
        self.cache.lengths[last] = 0

    def _plan(self) -> np.ndarray:
        """Tokens each row feeds this iteration: 1 per decoding row, then prompt chunks for the
        prefilling rows, oldest first, within the step's token budget."""
        counts = np.zeros(len(self._slots), np.int64)
        decoding = [i for i, s in enumerate(self._slots) if s.decoding]
        counts[decoding] = 1
        budget = max(self.step_tokens - len(decoding), max(1, self.step_tokens // 4))
        # a step of width W writes (scratch) K/V at lengths[b] .. lengths[b] + W - 1 of every
        # row: W stays within the cache (the headroom new_cache was asked for; an engine's
        # fixed capacity may have none)
        budget = min(budget, self.cache.capacity - int(self.cache.lengths[:len(counts)].max()))
        prefilling = sorted((i for i, s in enumerate(self._slots) if not s.decoding),
                            key=lambda i: self._slots[i].handle.id)   # ids follow submission
        for i in prefilling:
            slot = self._slots[i]
            n = min(len(slot.request.prompt_ids) - slot.fed, budget)
            counts[i] = n
            budget -= n
            if budget <= 0:
                break
        return counts

    def _iterate(self) -> None:
        counts = self._plan()
        width = int(counts.max())
        batch = len(self._slots)
        ids = np.zeros((batch, width), np.int64)
        positions = np.zeros((batch, width), np.int64)
        for row, (slot, n) in enumerate(zip(self._slots, counts)):
            if not n:
                continue
            if slot.decoding:
                ids[row, 0] = slot.next_token
            else:
                ids[row, :n] = slot.request.prompt_ids[slot.fed:slot.fed + n]
            positions[row, :n] = self.cache.lengths[row] + np.arange(n)
        start = time.perf_counter()
        try:
            logits = self.step.run(ids, positions, counts, self.cache)
        except Exception as error:          # the loop must outlive a failed step
            self._fail_all(error)
            return
        now = time.perf_counter()
        with self.metrics.lock:
            self.metrics.steps += 1
            self.metrics.step_time.observe(now - start)
            self.metrics.prompt_tokens += int(sum(n for s, n in zip(self._slots, counts)
                                                  if not s.decoding))
        finished = []
        for row, (slot, n) in enumerate(zip(self._slots, counts)):
            if not n:
                continue
            if not slot.decoding:
                slot.fed += int(n)
                if slot.fed < len(slot.request.prompt_ids):
                    continue            # more of the prompt to feed: these logits are unused
            if self._token(slot, logits[row], now):
                finished.append(row)
        with self._cond:
            for row in sorted(finished, reverse=True):
                self._free(row)
            self._gauges()

    def _token(self, slot: _Slot, logits: np.ndarray, now: float) -> bool:
        """Choose, record and deliver a row's next token; True when its request has ended."""
        request, handle = slot.request, slot.handle
        try:
            check_logits(logits[None], len(request.tokens), np.array([request.index]))
        except ArtifactError as error:
            handle._emit(Event(error=error))
            self._count_finish("error")
            return True
        token = request.choose(logits)
        piece = request.accept(token, now)
        logprob = _logprob(logits, token, handle.logprobs) if handle.logprobs is not None else None
        with self.metrics.lock:
            self.metrics.generation_tokens += 1
            if len(request.tokens) == 1:
                self.metrics.ttft.observe(now - request.start)
            else:
                self.metrics.itl.observe(now - slot.last_at)
        slot.last_at = now
        slot.next_token = token
        handle._emit(Event(text=piece, token_id=token, logprob=logprob))
        if request.finished:
            self._count_finish(request.finish.value)
            handle._emit(Event(result=request.result()))
            return True
        return False

    def _end(self, handle: Handle, reason: FinishReason) -> None:
        request = handle.request
        if not request.finished:
            request.cancel(reason, time.perf_counter())
        self._count_finish(reason.value)
        handle._emit(Event(result=request.result()))

    def _fail_all(self, error: Exception) -> None:
        """A step raised: every running request ends with the error, the slots are freed, and
        the loop goes on with the queue (a broken request never takes the server down)."""
        if not isinstance(error, MixbuildError):
            error = ArtifactError(f"the model step failed: {type(error).__name__}: {error}",
                                  hint="this is a failure of the model or its runtime; the "
                                       "requests that were running have ended")
        with self._cond:
            slots, self._slots = self._slots, []
            self.cache.lengths[:] = 0
            self._gauges()
        for slot in slots:
            self._count_finish("error")
            slot.handle._emit(Event(error=error))

    def _count_finish(self, reason: str) -> None:
        with self.metrics.lock:
            self.metrics.finished[reason] = self.metrics.finished.get(reason, 0) + 1


def _logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    scores = logits.astype(np.float64)
    shifted = scores - scores.max()
    logz = np.log(np.exp(shifted).sum())
    lp = shifted - logz
    best: tuple[tuple[int, float], ...] = ()
    if top:
        index = np.argpartition(-lp, top - 1)[:top]
        index = index[np.argsort(-lp[index], kind="stable")]
        best = tuple((int(i), float(lp[i])) for i in index)
    return TokenLogprob(token, float(lp[token]), best)
