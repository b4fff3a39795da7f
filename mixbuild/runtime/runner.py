"""The one Runner contract every backend implements, and the feeds of the ONNX contract.

    runner.infer(feeds: dict[str, ndarray]) -> dict[str, ndarray]

Feeds: input_ids int64 [B, S], attention_mask int64 [B, P+S], position_ids int64 [B, S],
past_key_values.{i}.key / .value [B, Nkv, P, D]. Outputs: logits float32 [B, S, V],
present.{i}.key / .value [B, Nkv, P+S, D].
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from mixbuild.model.spec import MixtralSpec


class Runner(Protocol):
    name: str

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ...


def input_names(spec: MixtralSpec) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(spec.num_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(spec: MixtralSpec) -> list[str]:
    names = ["logits"]
    for i in range(spec.num_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


def debug_output_names(spec: MixtralSpec) -> list[str]:
    names = []
    for i in range(spec.num_layers):
        names += [f"debug.{i}.router_logits", f"debug.{i}.expert_ids", f"debug.{i}.hidden"]
    return names


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
    feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
             "position_ids": positions_from_mask(attention_mask, seq)}
    empty = np.zeros((batch, spec.num_kv_heads, 0, spec.head_dim), dtype=kv_dtype)
    for i in range(spec.num_layers):
        feeds[f"past_key_values.{i}.key"] = empty
        feeds[f"past_key_values.{i}.value"] = empty
    return feeds


def decode_feeds(spec: MixtralSpec, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
                 next_tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for one decode step: the new tokens, the mask grown by one, present fed back as past."""
    batch = next_tokens.shape[0]
    mask = np.concatenate([feeds["attention_mask"], np.ones((batch, 1), np.int64)], axis=1)
    new = {"input_ids": next_tokens.reshape(batch, 1).astype(np.int64), "attention_mask": mask,
           "position_ids": positions_from_mask(mask, 1)}
    for i in range(spec.num_layers):
        new[f"past_key_values.{i}.key"] = outputs[f"present.{i}.key"]
        new[f"past_key_values.{i}.value"] = outputs[f"present.{i}.value"]
    return new


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
        tokens = forced[step] if forced is not None else outputs["logits"][:, -1].argmax(-1)
        feeds = decode_feeds(spec, feeds, outputs, tokens)
