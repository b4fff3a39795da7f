"""Comparison helpers shared by the equivalence tests."""

from __future__ import annotations

import numpy as np

from mixbuild.runtime.runner import greedy_steps


def left_padded_batch(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = rng.integers(3, vocab, n)
        mask[row, width - n:] = 1
    return ids, mask


def compare_runners(reference, candidate, input_ids, attention_mask, steps=16, check_present=True):
    """Greedy-decode with `reference`, force the same tokens through `candidate`; return the max
    abs logits difference over real (unpadded) positions and the number of calls compared."""
    spec = reference.spec
    ref = list(greedy_steps(reference, spec, input_ids, attention_mask, steps))
    tokens = [out["logits"][:, -1].argmax(-1) for _, out in ref]
    got = list(greedy_steps(candidate, spec, input_ids, attention_mask, steps, forced=tokens))
    worst = 0.0
    for (feeds, a), (_, b) in zip(ref, got):
        real = feeds["attention_mask"][:, -a["logits"].shape[1]:].astype(bool)
        worst = max(worst, float(np.abs(a["logits"] - b["logits"].astype(np.float32))[real].max()))
        for name in a:
            if check_present and name.startswith("present"):
                assert a[name].shape == b[name].shape, name
    return worst, len(got)
