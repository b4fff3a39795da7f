"""Sampling parameters and the per-request token chooser.

Every request owns a numpy Generator seeded from its own ``seed``, and every row is processed
on its own, so a seeded request draws the same tokens whatever else shares its batch.
Order of the logits processors: repetition penalty (transformers' definition, prompt and output
tokens), presence and frequency penalties (OpenAI's definition, output tokens only:
``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``), logit_bias
(added), min_tokens (the end-of-sequence and stop token ids masked until that many tokens are
out), then temperature, top-k, top-p and one draw. ``temperature == 0`` is greedy decoding
(argmax after the penalties and the bias).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixbuild.errors import UsageError
from mixbuild.model.generation import GenerationConfig


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off; seed None draws
    from fresh OS entropy. Stop strings are cut from the returned text; stop token ids (and the
    model's end-of-sequence ids) end a request without appearing in its text.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # token id -> added to its logit, in [-100, 100] (OpenAI's logit_bias); a dict is accepted
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0       # no end-of-sequence, stop token or stop string before this many

    def __post_init__(self) -> None:
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias.items())))
        object.__setattr__(self, "logit_bias", tuple(tuple(pair) for pair in self.logit_bias))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if isinstance(self.stop_token_ids, int):
            object.__setattr__(self, "stop_token_ids", (self.stop_token_ids,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_int("top_k", self.top_k, minimum=0)
        _check_number("temperature", self.temperature, "a number >= 0 (0 is greedy)",
                      lambda v: v >= 0)
        _check_number("top_p", self.top_p, "a number in (0, 1]", lambda v: 0 < v <= 1)
        _check_number("repetition_penalty", self.repetition_penalty, "a number > 0",
                      lambda v: v > 0)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UsageError("invalid sampling value for 'stop'", expected="non-empty strings",
                             found=repr(self.stop))
        for token in self.stop_token_ids:
            _check_int("stop_token_ids", token, minimum=0)
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), "a number in [-2, 2]", lambda v: -2 <= v <= 2)
        for pair in self.logit_bias:
            if len(pair) != 2:
                raise UsageError("invalid sampling value for 'logit_bias'",
                                 expected="token id -> bias pairs", found=repr(pair))
            _check_int("logit_bias", pair[0], minimum=0)
            _check_number("logit_bias", pair[1], "biases in [-100, 100]",
                          lambda v: -100 <= v <= 100)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.min_tokens > self.max_new_tokens:
            raise UsageError("invalid sampling value for 'min_tokens'",
                             expected=f"at most max_new_tokens ({self.max_new_tokens})",
                             found=repr(self.min_tokens))
        if self.greedy and (self.top_k or self.top_p < 1):
            raise UsageError("top_k / top_p have no effect with greedy decoding (temperature=0)",
                             found=f"top_k={self.top_k}, top_p={self.top_p}",
                             hint="pass temperature > 0 to sample, or drop top_k / top_p")

    def replace(self, **changes: Any) -> SamplingParams:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise UsageError(f"unknown sampling option(s): {', '.join(unknown)}",
                             expected=", ".join(f.name for f in dataclasses.fields(self)))
        return dataclasses.replace(self, **changes)

    def check_vocab(self, vocab_size: int) -> None:
        """A UsageError for a stop token id or a biased token the model cannot produce (outside
        [0, vocab_size)): it would never stop or change anything, silently."""
        for token in self.stop_token_ids:
            if not 0 <= token < vocab_size:
                raise UsageError(f"stop token id {token} is outside the vocabulary",
                                 expected=f"token ids in [0, {vocab_size}) (vocab_size {vocab_size})",
                                 found=f"stop_token_ids={list(self.stop_token_ids)}",
                                 hint="pass ids of this model's tokenizer (--stop-token-id)")
        for token, _ in self.logit_bias:
            if not 0 <= token < vocab_size:
                raise UsageError(f"invalid sampling value for 'logit_bias': token id {token} is "
                                 "outside the vocabulary",
                                 expected=f"token ids in [0, {vocab_size}) (vocab_size {vocab_size})",
                                 found=str(token), hint="pass ids of this model's tokenizer")

    def max_stop_length(self) -> int:
        return max((len(s) for s in self.stop), default=0)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"invalid sampling value for '{name}'",
                         expected=f"an integer >= {minimum}", found=repr(value))


def _check_number(name: str, value: Any, expected: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) \
            or not ok(value):
        raise UsageError(f"invalid sampling value for '{name}'", expected=expected, found=repr(value))


@dataclass(frozen=True)
class GenerationDefaults:
    """What an artifact's generation_config.json contributes: default sampling and the ids
    that end a sequence or pad a batch."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    @classmethod
    def read(cls, directory: Path, spec_eos: int | list[int] | None,
             vocab_size: int | None = None) -> GenerationDefaults:
        """generation_config.json of `directory` (absent: greedy, the spec's eos ids). Its
        eos_token_id / pad_token_id must be token ids (integers in [0, vocab_size) when
        `vocab_size` is given): a ConfigError naming the file, the field and the value."""
        config = GenerationConfig.read(directory, spec_eos, vocab_size)
        return cls(sampling=_sampling_from_config(config.fields),
                   eos_token_ids=config.eos_token_ids, pad_token_id=config.pad_token_id)


def _sampling_from_config(config: dict[str, Any]) -> SamplingParams:
    """transformers' GenerationConfig fields -> SamplingParams; sampling filters count only
    when the config samples (do_sample true), as in transformers."""
    values: dict[str, Any] = {}
    if isinstance(config.get("max_new_tokens"), int) and config["max_new_tokens"] > 0:
        values["max_new_tokens"] = config["max_new_tokens"]
    if config.get("repetition_penalty") not in (None, 1.0):
        values["repetition_penalty"] = float(config["repetition_penalty"])
    if config.get("do_sample"):
        values["temperature"] = float(config.get("temperature") or 1.0)
        values["top_k"] = int(config.get("top_k") if config.get("top_k") is not None else 50)
        values["top_p"] = float(config.get("top_p") if config.get("top_p") is not None else 1.0)
    return SamplingParams(**values)


class TokenChooser:
    """One request's logits -> token: penalties, bias, min_tokens mask, temperature, top-k,
    top-p, draw (or argmax). `stop_ids`: the ids that would end the request (masked while fewer
    than min_tokens tokens are out)."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int],
                 stop_ids: set[int] | tuple[int, ...] = ()) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.seen: np.ndarray | None = None
        if params.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab_size, dtype=bool)
            self.seen[np.asarray(prompt_ids, dtype=np.int64)] = True
        self.counts: np.ndarray | None = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = np.zeros(vocab_size, dtype=np.float32)
        self.bias: np.ndarray | None = None
        if params.logit_bias:
            self.bias = np.zeros(vocab_size, dtype=np.float32)
            for token, value in params.logit_bias:
                self.bias[token] = value
        self.held = (np.asarray(sorted(stop_ids), dtype=np.int64)
                     if params.min_tokens and stop_ids else None)
        self.generated = 0
        self.plain_greedy = (params.greedy and self.seen is None and self.counts is None
                             and self.bias is None and self.held is None)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if self.seen is not None:
            logits = _penalize(logits, self.seen, p.repetition_penalty)
        if self.counts is not None:
            logits = (logits - self.counts * np.float32(p.frequency_penalty)
                      - (self.counts > 0) * np.float32(p.presence_penalty)).astype(np.float32)
        if self.bias is not None:
            logits = (logits + self.bias).astype(np.float32)
        if self.held is not None and self.generated < p.min_tokens:
            logits = logits.astype(np.float32, copy=True)
            logits[self.held] = -np.inf
        if p.greedy:
            token = int(np.argmax(logits))
        else:
            token = self._draw(logits.astype(np.float64) / p.temperature)
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        self.generated += 1
        return token

    def _draw(self, scores: np.ndarray) -> int:
        p = self.params
        if p.top_k and p.top_k < scores.shape[0]:
            kth = np.partition(scores, -p.top_k)[-p.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max())
        if p.top_p < 1.0:
            probs = _nucleus(probs / probs.sum(), p.top_p)
        cdf = np.cumsum(probs)
        token = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return min(token, probs.shape[0] - 1)


def _penalize(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    out = logits.astype(np.float32, copy=True)
    hit = out[seen]
    out[seen] = np.where(hit > 0, hit / penalty, hit * penalty)
    return out


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Zero every token outside the smallest set whose probability reaches top_p (transformers'
    rule: drop a token when the mass strictly before it, in descending order, is >= top_p)."""
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    out = np.zeros_like(probs)
    keep = order[before < top_p]
    out[keep] = probs[keep]
    return out
