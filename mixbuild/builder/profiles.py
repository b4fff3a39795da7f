"""Optimisation profiles over the contract's dynamic dims: batch, seq, past_seq, total_seq
(concat layout) and capacity (serving layout).

Two profiles, so that TensorRT tunes the two kinds of call separately:

    prefill  seq 1..N (opt N), past 0..C-N (opt 0), N = max_step_tokens, C = max_context: a
             prompt, or a chunk of one appended to an existing cache; batch opt 1 (one long prompt).
    decode   seq 1, past 1..max_context-1 (opt max_context/2), batch opt max_batch (the
             batched steady state).
    total_seq = past_seq + seq in both. A serving-layout artifact's cache has one fixed
    capacity C = max_context in both (its buffers are allocated once), so only batch and seq
    vary.

Each input's shape comes from its ONNX symbolic dims (dim_param names), so the profiles
follow the artifact's contract rather than guessing from tensor names. At run time a caller
picks a profile with `select_profile` (the tightest profile containing the feed shapes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mixbuild.builder.options import Limits
from mixbuild.errors import ArtifactError, UsageError

DIMS = ("batch", "seq", "past_seq", "total_seq", "capacity")   # concat, then serving layout


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class Profile:
    name: str
    dims: dict[str, DimRange]

    def shapes(self, inputs: Mapping[str, Sequence[int | str]]) -> dict[str, dict[str, list[int]]]:
        """{input: {"min": [...], "opt": [...], "max": [...]}} for inputs given as symbolic shapes."""
        return {name: {which: [self._size(name, d, which) for d in shape]
                       for which in ("min", "opt", "max")}
                for name, shape in inputs.items()}

    def _size(self, tensor: str, dim: int | str, which: str) -> int:
        if isinstance(dim, int):
            return dim
        if dim not in self.dims:
            raise ArtifactError(f"input '{tensor}' has a dynamic dim '{dim}' the builder has no "
                                "range for", expected=f"one of {', '.join(DIMS)} or a fixed size",
                                hint="export the artifact again with this mixbuild version")
        return getattr(self.dims[dim], which)

    def to_dict(self, inputs: Mapping[str, Sequence[int | str]]) -> dict:
        used = {d for shape in inputs.values() for d in shape if isinstance(d, str)}
        return {"name": self.name,
                "dims": {k: v.as_list() for k, v in self.dims.items() if k in used},
                "shapes": self.shapes(inputs)}


def make_profiles(limits: Limits) -> list[Profile]:
    b, s, c = limits.max_batch, limits.max_step_tokens, limits.max_context
    capacity = DimRange(c, c, c)   # the serving layout's cache: one fixed capacity per engine
    prefill = {"batch": DimRange(1, 1, b), "seq": DimRange(1, s, s),
               "past_seq": DimRange(0, 0, c - s), "total_seq": DimRange(1, s, c),
               "capacity": capacity}
    half = max(1, c // 2)
    decode = {"batch": DimRange(1, b, b), "seq": DimRange(1, 1, 1),
              "past_seq": DimRange(1, half, c - 1), "total_seq": DimRange(2, half + 1, c),
              "capacity": capacity}
    return [Profile("prefill", prefill), Profile("decode", decode)]


def input_dims(model) -> dict[str, list[int | str]]:
    """Symbolic shapes of the graph inputs of an onnx.ModelProto (initializers excluded)."""
    initializers = {t.name for t in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_param if d.dim_param else int(d.dim_value) for d in dims]
    return shapes


def select_profile(profiles: Sequence[Mapping], shapes: Mapping[str, Sequence[int]]) -> int:
    """Index of the tightest profile (as recorded in engine.json) that contains `shapes`.

    Raises UsageError naming the envelope when no profile fits (e.g. a context longer than the
    engine's max_context)."""
    best, best_width = None, None
    for index, profile in enumerate(profiles):
        ranges = profile["shapes"]
        if not all(_fits(ranges.get(name), shape) for name, shape in shapes.items()):
            continue
        width = sum(hi - lo for r in ranges.values() for lo, hi in zip(r["min"], r["max"]))
        if best_width is None or width < best_width:
            best, best_width = index, width
    if best is None:
        envelope = "; ".join(f"{p['name']}: " + ", ".join(f"{k} {v[0]}..{v[2]}"
                                                           for k, v in p["dims"].items())
                             for p in profiles)
        raise UsageError("the feed shapes fit none of the engine's optimisation profiles",
                         expected=envelope,
                         found=", ".join(f"{k} {list(v)}" for k, v in shapes.items()),
                         hint="rebuild the engine with larger --max-batch/--max-step-tokens/--max-context")
    return best


def _fits(ranges: Mapping | None, shape: Sequence[int]) -> bool:
    if ranges is None or len(ranges["min"]) != len(shape):
        return False
    return all(lo <= n <= hi for lo, n, hi in zip(ranges["min"], shape, ranges["max"]))
