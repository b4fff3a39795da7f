"""The one Runner contract every backend implements, and the feeds of the ONNX contract.

    runner.infer(feeds: dict[str, ndarray]) -> dict[str, ndarray]

The feeds and outputs are the ONNX contract's (names and shapes in mixbuild.contract and
docs/contract.md): token inputs and the past KV cache in, logits and the present cache out.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from mixbuild.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, kv_inputs, kv_pairs
from mixbuild.model.spec import MixtralSpec


class Runner(Protocol):
    name: str

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ...


def left_pad(prompts, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-id sequences -> (input_ids, attention_mask) int64 [B, longest], padded on the left."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def positions_from_mask(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """position_ids of the last `seq` tokens: count of real tokens before each, pads at 0."""
    pos = np.cumsum(attention_mask, axis=-1) - 1
    return np.clip(pos, 0, None)[:, -seq:].astype(np.int64)


def prefill_feeds(spec: MixtralSpec, input_ids: np.ndarray, attention_mask: np.ndarray,
                  kv_dtype=np.float32) -> dict[str, np.ndarray]:
    batch, seq = input_ids.shape
    feeds = {INPUT_IDS: input_ids.astype(np.int64), ATTENTION_MASK: attention_mask.astype(np.int64),
             POSITION_IDS: positions_from_mask(attention_mask, seq)}
    empty = np.zeros((batch, spec.num_kv_heads, 0, spec.head_dim), dtype=kv_dtype)
    return {**feeds, **dict.fromkeys(kv_inputs(spec.num_layers), empty)}


def decode_feeds(spec: MixtralSpec, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
                 next_tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for one decode step: the new tokens, the mask grown by one, present fed back as past."""
    batch = next_tokens.shape[0]
    mask = np.concatenate([feeds[ATTENTION_MASK], np.ones((batch, 1), np.int64)], axis=1)
    new = {INPUT_IDS: next_tokens.reshape(batch, 1).astype(np.int64), ATTENTION_MASK: mask,
           POSITION_IDS: positions_from_mask(mask, 1)}
    return {**new, **{past: outputs[present] for past, present in kv_pairs(spec.num_layers)}}


def greedy_steps(runner: Runner, spec: MixtralSpec, input_ids: np.ndarray, attention_mask: np.ndarray,
                 steps: int, kv_dtype=np.float32, forced: list[np.ndarray] | None = None):
    """Prefill then `steps` decode steps. Yields (feeds, outputs) per call. The next tokens are
    the argmax of the last logits, or forced[i] when given (so two runners follow one path)."""
    feeds = prefill_feeds(spec, input_ids, attention_mask, kv_dtype)
    for step in range(steps + 1):
        outputs = runner.infer(feeds)
        yield feeds, outputs
        if step == steps:
            return
        tokens = forced[step] if forced is not None else outputs[LOGITS][:, -1].argmax(-1)
        feeds = decode_feeds(spec, feeds, outputs, tokens)
