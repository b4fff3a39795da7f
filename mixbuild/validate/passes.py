"""How the validator drives one model through its two passes, whatever its KV-cache layout.

    model.teacher_forced(batch, chunk)  -> yields (start, stop, outputs) per chunk of columns
    model.greedy(batch, steps)          -> (tokens [B, N], margins [B, N], finite [B, N, 2])

`outputs` are in the coordinates of the left-padded Batch: `logits` [B, n, V] for columns
start..stop, `debug.{i}.*` per-token values [B*n, ...] (row-major over [B, n]) and
`debug.{i}.hidden` [B, n, H]. A chunk feeds the KV cache the earlier chunks filled, so a long
sequence is compared a chunk at a time and memory stays bounded by the chunk's logits.

- `ConcatModel`: any Runner of the concat layout (transformers, ONNX Runtime, torch, TensorRT):
  past in, present out.
- `ServingModel`: an ONNX Runtime session of a serving-layout artifact. The teacher-forced
  pass right-aligns each row's tokens of the chunk (input_lengths) over cache_lengths already
  written (0 for the first chunk) and reads the all-position logits the diagnostic copy of the
  graph exposes (`diagnostics.ALL_LOGITS`); the greedy pass is the runtime's own
  `ServingStep` (the cache bound in place, last-token logits), as `mixbuild run` drives it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from mixbuild.contract import (
    ATTENTION_MASK,
    CACHE_LENGTHS,
    INPUT_IDS,
    INPUT_LENGTHS,
    LOGITS,
    POSITION_IDS,
    Debug,
    cache_pairs,
    kv_pairs,
)
from mixbuild.runtime.runner import greedy_steps, positions_from_mask, prefill_feeds
from mixbuild.runtime.steps import right_align
from mixbuild.validate import metrics as M
from mixbuild.validate.data import Batch


def _chunks(width: int, chunk: int | None):
    step = width if not chunk else max(1, chunk)
    return [(a, min(a + step, width)) for a in range(0, width, step)]


def greedy_record(last_logits: list[np.ndarray]):
    """Tokens, margins and finiteness [B, N, 2] of a list of [B, V] last-token logits."""
    tokens = np.stack([x.argmax(-1) for x in last_logits], axis=1)
    margins = np.stack([M.logit_margin(x) for x in last_logits], axis=1)
    ok = np.stack([np.stack([~np.isnan(x).any(-1), ~np.isinf(x).any(-1)], axis=-1)
                   for x in last_logits], axis=1)
    return tokens, margins, ok


class PassModel:
    """What the validator's passes drive: teacher-forced chunks and greedy decoding of a batch,
    whatever layout runs underneath (ConcatModel, ServingModel)."""

    name: str

    def teacher_forced(self, batch: Batch, chunk: int | None = None) -> Iterator:
        raise NotImplementedError

    def greedy(self, batch: Batch, steps: int):
        raise NotImplementedError


class ConcatModel(PassModel):
    """A concat-layout Runner (`infer(feeds) -> outputs` with past / present)."""

    def __init__(self, runner, spec, kv_dtype=np.float32) -> None:
        self.runner, self.spec, self.kv_dtype = runner, spec, kv_dtype
        self.name = runner.name

    def teacher_forced(self, batch: Batch, chunk: int | None = None) -> Iterator:
        spec, ids, mask = self.spec, batch.input_ids, batch.attention_mask
        feeds = prefill_feeds(spec, ids[:, :0], mask[:, :0], self.kv_dtype)
        for start, stop in _chunks(ids.shape[1], chunk):
            feeds[INPUT_IDS] = ids[:, start:stop]
            feeds[ATTENTION_MASK] = mask[:, :stop]
            feeds[POSITION_IDS] = positions_from_mask(mask[:, :stop], stop - start)
            outputs = self.runner.infer(feeds)
            yield start, stop, outputs
            feeds = {**feeds, **{past: outputs[present] for past, present in kv_pairs(spec.num_layers)}}

    def greedy(self, batch: Batch, steps: int):
        last = [out[LOGITS][:, -1] for _, out in greedy_steps(
            self.runner, self.spec, batch.input_ids, batch.attention_mask, steps - 1,
            kv_dtype=self.kv_dtype)]
        return greedy_record(last)


class ServingModel(PassModel):
    """An OrtRunner of a serving-layout artifact whose graph copy exposes the diagnostics
    (`diagnostics.expose`; `exposed` renames its outputs)."""

    def __init__(self, runner, exposed, spec) -> None:
        self.runner, self.exposed, self.spec = runner, exposed, spec
        self.kv_dtype = runner.kv_dtype
        self.name = runner.name

    # ------------------------------------------------------------------ teacher-forced
    def teacher_forced(self, batch: Batch, chunk: int | None = None) -> Iterator:
        ids, mask = batch.input_ids, batch.attention_mask
        rows, width = ids.shape
        pad = width - mask.sum(axis=1)               # left padding of each row
        spec = self.spec
        cache = [np.zeros((rows, spec.num_kv_heads, width, spec.head_dim), self.kv_dtype)
                 for _ in range(2 * spec.num_layers)]
        for start, stop in _chunks(width, chunk):
            first = np.maximum(pad, start)            # the row's first real column of the chunk
            counts = np.maximum(stop - first, 0).astype(np.int64)
            written = np.maximum(start - pad, 0).astype(np.int64)
            n = stop - start
            right = right_align(ids[:, start:stop], counts)   # a row's real tokens end the chunk
            positions = written[:, None] + np.arange(n)[None, :]
            # GroupQueryAttention takes several new tokens over a filled cache one row at a time
            groups = [slice(0, rows)] if not written.any() or rows == 1 else \
                [slice(r, r + 1) for r in range(rows)]
            parts = [self._run(right[g], positions[g], written[g], counts[g], cache, g)
                     for g in groups]
            yield start, stop, self._to_left(parts, groups, counts, n)

    def _run(self, ids, positions, written, counts, cache, rows: slice) -> dict:
        feeds = {INPUT_IDS: ids, POSITION_IDS: positions, CACHE_LENGTHS: written,
                 INPUT_LENGTHS: counts}
        pairs = cache_pairs(self.spec.num_layers)
        for (name, _), buffer in zip(pairs, cache):
            feeds[name] = np.ascontiguousarray(buffer[rows])
        outputs = self.exposed.rename(self.runner.infer(feeds))
        for (_, updated), buffer in zip(pairs, cache):
            buffer[rows] = outputs.pop(updated)
        return outputs

    def _to_left(self, parts: list[dict], groups: list[slice], counts: np.ndarray, n: int) -> dict:
        """Right-aligned chunk outputs of each row group -> the left-padded [B, n] columns."""
        from mixbuild.validate.diagnostics import ALL_LOGITS

        rows = len(counts)
        # left column j of row r holds right position j - (n - counts[r]) when that is >= 0
        src_pos = np.arange(n)[None, :] - (n - counts[:, None])
        valid = src_pos >= 0
        src_pos = np.where(valid, src_pos, 0)
        out = {}
        for key in parts[0]:
            if not (key == ALL_LOGITS or key.startswith("debug.")):
                continue
            arrays = [p[key] for p in parts]
            per_row = [a.reshape(g.stop - g.start, n, -1) for g, a in zip(groups, arrays)]
            full = np.concatenate(per_row, axis=0)              # [B, n, X]
            picked = np.take_along_axis(full, src_pos[:, :, None], axis=1)
            picked = np.where(valid[:, :, None], picked, np.zeros((), picked.dtype))
            if key == ALL_LOGITS:
                out[LOGITS] = picked
            elif key.endswith("." + Debug.HIDDEN.value):
                out[key] = picked
            else:
                out[key] = picked.reshape(rows * n, -1)
        return out

    # ------------------------------------------------------------------ greedy
    def greedy(self, batch: Batch, steps: int):
        from mixbuild.runtime.steps import ServingStep

        ids, mask = batch.input_ids, batch.attention_mask
        rows, width = ids.shape
        step = ServingStep(self.runner, capacity=width + steps, max_batch=rows)
        cache = step.new_cache()
        logits = step(ids, mask, positions_from_mask(mask, width), cache)
        last = [logits]
        for _ in range(steps - 1):
            mask = np.concatenate([mask, np.ones((rows, 1), np.int64)], axis=1)
            logits = step(logits.argmax(-1)[:, None].astype(np.int64), mask,
                          positions_from_mask(mask, 1), cache)
            last.append(logits)
        return greedy_record(last)
