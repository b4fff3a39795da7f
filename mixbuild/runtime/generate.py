"""The generation loop: left-padded batched prefill, decode steps over the runtime's KV cache,
per-request sampling and stop conditions, and batch compaction when requests finish.

`run_batch` is a generator of (request index, text piece) events, so streaming and
non-streaming generation are the same code: `generate` drains it, `stream` forwards it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import numpy as np

from mixbuild.errors import ArtifactError
from mixbuild.runtime.runner import left_pad, positions_from_mask
from mixbuild.runtime.sampling import SamplingParams, TokenChooser
from mixbuild.runtime.tokenizer import IncrementalDetokenizer, Tokenizer


class FinishReason(str, Enum):
    STOP = "stop"      # an end-of-sequence id, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens, or the context limit
    CANCELLED = "cancelled"  # the caller cancelled it (a stream closed, a client went away)


@dataclass(frozen=True)
class Timings:
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_s: float
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first (the decode rate)."""
        spent = self.total_s - self.time_to_first_token_s
        return (self.generated_tokens - 1) / spent if self.generated_tokens > 1 and spent > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0


@dataclass(frozen=True)
class Result:
    """One request's output: generated text (None without a tokenizer) and token ids."""

    text: str | None
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: FinishReason
    stopped_by: str | int | None
    timings: Timings


class Request:
    """The mutable state of one request while it is generated."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, budget: int, vocab_size: int,
                 eos_ids: tuple[int, ...], tokenizer: Tokenizer | None, start: float) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.budget = budget
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.choose = TokenChooser(params, vocab_size, prompt_ids, self.stop_ids)
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.max_stop = params.max_stop_length()
        self.tokens: list[int] = []
        self.text = ""
        self.released = 0
        self.finish: FinishReason | None = None
        self.stopped_by: str | int | None = None
        self.start, self.first_at, self.end_at = start, 0.0, 0.0
        self.index = 0    # its position among the prompts of its call (for error messages)

    @property
    def finished(self) -> bool:
        return self.finish is not None

    def accept(self, token: int, now: float) -> str:
        """Record one generated token; return the text that may be shown now."""
        self.tokens.append(token)
        self.first_at = self.first_at or now
        if token in self.stop_ids:
            self._finish(FinishReason.STOP, token, now)
        elif self.detok is not None:
            self._add_text(self.detok.push(token), now)
        if not self.finished and len(self.tokens) >= self.budget:
            self._finish(FinishReason.LENGTH, None, now)
        return self._release()

    def cancel(self, reason: FinishReason, now: float) -> None:
        """End the request where it stands (the text held back for a stop string is kept)."""
        self._finish(reason, None, now)
        self.released = len(self.text)

    def _finish(self, reason: FinishReason, cause, now: float) -> None:
        self.finish, self.stopped_by, self.end_at = reason, cause, now
        if self.detok is not None and not isinstance(cause, str):
            self._add_text(self.detok.flush(), now)

    def _add_text(self, piece: str, now: float) -> None:
        if not piece or not self.max_stop or len(self.tokens) < self.params.min_tokens:
            self.text += piece
            return
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += piece
        hits = [(self.text.find(s, start), s) for s in self.params.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if hits:
            pos, stop = min(hits)
            self.text = self.text[:pos]
            if not self.finished:
                self._finish(FinishReason.STOP, stop, now)

    def _release(self) -> str:
        end = len(self.text) if self.finished else len(self.text) - self._holdback()
        piece, self.released = self.text[self.released:end], max(self.released, end)
        return piece

    def _holdback(self) -> int:
        """Length of the longest tail of the text that could begin a stop string."""
        for size in range(min(self.max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.params.stop):
                return size
        return 0

    def result(self) -> Result:
        timings = Timings(len(self.prompt_ids), len(self.tokens), self.first_at - self.start,
                          self.end_at - self.start)
        return Result(self.text if self.detok is not None else None, list(self.tokens),
                      list(self.prompt_ids), self.finish, self.stopped_by, timings)


class _Batch:
    """Which requests the rows of the running batch hold, their mask and next positions."""

    def __init__(self, requests: list[Request], mask: np.ndarray) -> None:
        self.requests = requests
        self.rows = np.arange(len(requests))
        self.mask = mask
        self.next_position = mask.sum(axis=1)

    def alive(self) -> np.ndarray:
        return np.array([r for r, i in enumerate(self.rows) if not self.requests[i].finished],
                        dtype=np.int64)

    def compact(self, keep: np.ndarray, cache) -> None:
        """Drop finished rows and the padding columns no surviving row needs."""
        mask = self.mask[keep]
        trim = int(np.argmax(mask.any(axis=0)))
        cache.compact(keep, trim)
        self.rows, self.mask = self.rows[keep], mask[:, trim:]
        self.next_position = self.next_position[keep]

    def decode_inputs(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ones = np.ones((len(self.rows), 1), np.int64)
        self.mask = np.concatenate([self.mask, ones], axis=1)
        positions = self.next_position[:, None].copy()
        self.next_position = self.next_position + 1
        return tokens.reshape(-1, 1), self.mask, positions


def _choose(logits: np.ndarray, rows: np.ndarray, requests: list[Request],
            all_argmax: bool) -> np.ndarray:
    """The next token of every row: one batched argmax when every request is plain greedy."""
    if all_argmax:
        return np.argmax(logits, axis=-1).astype(np.int64)
    return np.array([requests[i].choose(logits[row]) for row, i in enumerate(rows)], np.int64)


def check_logits(logits: np.ndarray, step: int, rows: np.ndarray, first: int = 0) -> None:
    """An ArtifactError when a row of `logits` [B, V] holds NaN or Inf: the argmax of a NaN row
    is the NaN's index (token 0 for an all-NaN row) and sampling from it is undefined, so the
    runtime must not turn it into a token. `rows` maps batch rows to request indices, offset
    by `first` (the call's index of the batch's first request)."""
    finite = np.isfinite(logits).all(axis=-1)
    if finite.all():
        return
    row = int(np.argmin(finite))
    values = logits[row]
    nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    where = "the prompt's prefill" if step == 0 else f"decode step {step}"
    raise ArtifactError(
        f"the model produced non-finite logits for request {first + int(rows[row])} (batch row "
        f"{row}) at generation step {step} ({where})",
        expected="finite logits", found=f"{nan} NaN and {inf} Inf among {values.size} vocabulary "
                                        f"entries; {int((~finite).sum())} of {finite.size} rows affected",
        hint="the model computes NaN/Inf, so no token can be chosen: check it with `mixbuild "
             "validate`; an fp16 artifact can overflow, so re-export with --dtype bf16 or fp32")


def run_batch(step, cache, requests: list[Request], pad_id: int,
              first: int = 0) -> Iterator[tuple[int, str]]:
    """Generate every request of one batch; yields (index in `requests`, text piece). `first`
    is only for error messages: the index of requests[0] among the call's requests."""
    ids, mask = left_pad([r.prompt_ids for r in requests], pad_id)
    cache.reset(len(requests), ids.shape[1] + max(r.budget for r in requests))
    batch = _Batch(requests, mask)
    logits = step(ids, mask, positions_from_mask(mask, ids.shape[1]), cache)
    all_argmax = all(r.choose.plain_greedy for r in requests)
    steps = 0
    while True:
        check_logits(logits, steps, batch.rows, first)
        tokens = _choose(logits, batch.rows, requests, all_argmax)
        now = time.perf_counter()
        for row, index in enumerate(batch.rows):
            piece = requests[index].accept(int(tokens[row]), now)
            if piece:
                yield int(index), piece
        keep = batch.alive()
        if keep.size == 0:
            return
        if keep.size < len(batch.rows):
            batch.compact(keep, cache)
            tokens = tokens[keep]
        logits = step(*batch.decode_inputs(tokens), cache)
        steps += 1
