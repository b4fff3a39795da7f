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


def write_engine_dir(directory, spec, plan: bytes = b"not a plan", backend: str = "tensorrt",
                     dtype: str = "float32", layout: str | None = None, **changes):
    """An engine directory whose engine.json has every field mixbuild writes (for `spec`, a
    float engine of `dtype`, one profile; `layout` "serving" adds the serving layout's I/O and
    cache capacity, None leaves the field out as older engines did) and whose plan is `plan`,
    recorded with its sha256: for the runtime's and inspect's manifest checks where no real
    engine can be built."""
    import hashlib
    import json
    from pathlib import Path

    from mixbuild.contract import ENGINE_FORMAT_VERSION, DType, Layout, Precision, io_specs

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "engine.plan").write_bytes(plan)
    inputs, outputs = io_specs(spec, DType(dtype), False, Layout(layout or "concat"))
    limits = {"max_batch": 1, "max_step_tokens": 16, "max_context": 64}
    if layout is not None:
        changes = {"layout": layout, "logits": "last" if layout == "serving" else "all",
                   "cache_capacity": limits["max_context"] if layout == "serving" else None,
                   **changes}
    tensor = lambda t: {"name": t.name, "dtype": t.dtype,  # noqa: E731
                        "shape": [d if isinstance(d, int) else -1 for d in t.dims], "dims": list(t.dims)}
    precision = Precision.of_dtype(DType(dtype)).value
    module = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}[backend]
    manifest = {
        "kind": "engine", "format_version": ENGINE_FORMAT_VERSION, "backend": backend,
        "tensorrt": {"module": module, "version": "10.0.0", "onnx_parser_version": 200},
        "compute_capability": "8.9", "moe": "inline", "precision": precision, "dtype": dtype,
        "spec": spec.to_dict(), "limits": limits,
        "profiles": [{"name": "prefill", "dims": {"batch": [1, 1, 1]},
                      "shapes": {"input_ids": {"min": [1, 1], "opt": [1, 8], "max": [1, 16]}}}],
        "inputs": [tensor(t) for t in inputs], "outputs": [tensor(t) for t in outputs],
        "io_source": "network", "plugins": [], "plugin_registration": None,
        "layers": {"source": "network", "count": 0, "items": []},
        "builder": {"optimization_level": 0, "strongly_typed": True,
                    "profiling_verbosity": "DETAILED", "graph_rewrites": [], "timing_cache": None},
        "source": {"artifact": str(directory / "no-such-artifact"), "manifest_sha256": "0" * 64,
                   "precision": precision, "dtype": dtype, "producer": "0.1.0"},
        "plan": {"file": "engine.plan", "sha256": hashlib.sha256(plan).hexdigest(),
                 "bytes": len(plan)},
        "build": {"wall_s": 1.0, "parse_s": 0.1, "build_s": 0.9},
        **changes,
    }
    (directory / "engine.json").write_text(json.dumps(manifest))
    return directory
