"""Pass/fail thresholds per precision, kept as data in tolerances.json next to this module.

    tol = load_tolerances("fp8", overrides={"top1_agreement": 0.95})
    check = tol.check("top1_agreement", 0.981)   # Check(passed=True, bound='>=', ...)

Every threshold has a direction (THRESHOLDS): an upper bound ('<='), a lower bound ('>='), or
an upper bound on the magnitude ('|x| <=', for the perplexity delta, which may go either way).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from mixbuild.contract import Precision
from mixbuild.errors import UsageError
from mixbuild.validate.result import Check


class Bound(str, Enum):
    AT_MOST = "<="
    AT_LEAST = ">="
    ABS_AT_MOST = "|x| <="

    def holds(self, value: float, threshold: float) -> bool:
        if self is Bound.AT_MOST:
            return value <= threshold
        if self is Bound.AT_LEAST:
            return value >= threshold
        return abs(value) <= threshold


# metric name -> direction of its threshold (the metric keys of tolerances.json)
THRESHOLDS: dict[str, Bound] = {
    "logits_max_abs": Bound.AT_MOST,
    "logits_cosine_min": Bound.AT_LEAST,
    "kl_mean": Bound.AT_MOST,
    "top1_agreement": Bound.AT_LEAST,
    "ppl_rel_delta": Bound.ABS_AT_MOST,
    "greedy_match_fraction": Bound.AT_LEAST,
    "router_flip_rate": Bound.AT_MOST,
    "expert_rel_error": Bound.AT_MOST,
}
# allowed value range of every numeric field
RANGES: dict[str, tuple[float, float]] = {
    "logits_max_abs": (0.0, math.inf), "logits_cosine_min": (-1.0, 1.0), "kl_mean": (0.0, math.inf),
    "top1_agreement": (0.0, 1.0), "ppl_rel_delta": (0.0, math.inf),
    "greedy_match_fraction": (0.0, 1.0), "router_flip_rate": (0.0, 1.0),
    "router_near_tie_gap": (0.0, 1.0), "expert_rel_error": (0.0, math.inf),
}
# keys a tolerances entry may leave out (their defaults below)
OPTIONAL = ("router_near_tie_gap", "expert_rel_error")


@dataclass(frozen=True)
class Tolerances:
    """Thresholds of one precision (what each protects: docs/validation.md).
    router_near_tie_gap is not a threshold but the router probability gap under which a
    routing flip is counted as a near tie; expert_rel_error (default: no bound) bounds every
    expert's relative output error on the reference MoE inputs."""

    precision: Precision
    logits_max_abs: float
    logits_cosine_min: float
    kl_mean: float
    top1_agreement: float
    ppl_rel_delta: float
    greedy_match_fraction: float
    router_flip_rate: float
    router_near_tie_gap: float = 0.01
    expert_rel_error: float = math.inf

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.precision, Precision):
            raise UsageError("tolerances: precision must be a Precision", found=repr(self.precision))
        for name, (low, high) in RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise UsageError(f"tolerance '{name}' must be a number", found=repr(value))
            if not low <= value <= high:
                raise UsageError(f"tolerance '{name}' is out of range",
                                 expected=f"{low} <= {name} <= {high}", found=repr(value))

    def check(self, name: str, value: float | None,
              interval: tuple[float, float] | None = None) -> Check:
        """Compare one metric with its threshold; a None, NaN or infinite value fails (a metric
        over NaN / Inf outputs is NaN, and no bound is met by an infinity that is not an
        error: -inf <= threshold must not pass).

        With the metric's 95% `interval`, the end that is unfavourable for the bound is judged
        (the lower end for '>=', the upper for '<=', the one farther from 0 for '|x| <='): the
        check passes only when the measurement shows, with 95% confidence, that the threshold
        is met, so a value within sampling noise of the threshold does not pass by luck. An
        exact threshold (a rate of 1.0 at least, or 0 at most) is judged on the value itself:
        no finite sample can bound a rate to exactly 1, and the exact precisions claim that no
        position may disagree."""
        bound, threshold = THRESHOLDS[name], getattr(self, name)
        judged, statistic = value, "value"
        exact = (bound is Bound.AT_LEAST and threshold >= 1.0) or \
            (bound is not Bound.AT_LEAST and threshold == 0.0)
        if interval is not None and value is not None and not exact:
            low, high = (float(x) for x in interval)
            judged, statistic = {Bound.AT_LEAST: (low, "lower95"), Bound.AT_MOST: (high, "upper95"),
                                 Bound.ABS_AT_MOST: (max(abs(low), abs(high)), "far95")}[bound]
        measured = judged is not None and math.isfinite(judged) and math.isfinite(value)
        passed = measured and bound.holds(float(judged), threshold)
        return Check(name=name, value=value, threshold=threshold, bound=bound.value,
                     passed=bool(passed), judged=judged, statistic=statistic,
                     interval=tuple(interval) if interval is not None else None)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["precision"] = self.precision.value
        return out


def field_names() -> list[str]:
    """The keys a tolerances entry or an override may set."""
    return list(RANGES)


def load_table(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The raw tolerances table {precision: {field: value}}: the packaged one, or `path`."""
    if path is None:
        from importlib.resources import files

        source, text = "tolerances.json", (files("mixbuild.validate") / "tolerances.json").read_text()
    else:
        source = str(path)
        if not Path(path).is_file():
            raise UsageError(f"tolerances file not found: {path}")
        try:
            text = Path(path).read_text()
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path}: not UTF-8 text", found=str(exc)) from exc
    try:
        table = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source}: not valid JSON", found=str(exc)) from exc
    if not isinstance(table, dict):
        raise UsageError(f"{source}: expected a JSON object keyed by precision",
                         found=type(table).__name__)
    return {k: v for k, v in table.items() if not k.startswith("_")}


def load_tolerances(precision: str | Precision, overrides: Mapping[str, float] | None = None,
                    path: str | Path | None = None) -> Tolerances:
    """The thresholds for `precision` from the packaged table (or the JSON file `path`, same
    layout), with `overrides` applied, e.g. {"top1_agreement": 0.95}. Unknown keys, unknown
    precisions and out-of-range values raise UsageError."""
    precision = Precision.parse(precision)
    table = load_table(path)
    source = str(path) if path is not None else "tolerances.json"
    entry = table.get(precision.value)
    if not isinstance(entry, dict):
        raise UsageError(f"{source} has no thresholds for precision '{precision.value}'",
                         found=", ".join(sorted(table)) or "no precisions")
    _check_keys(entry, f"{source} [{precision.value}]", required=True)
    _check_keys(dict(overrides or {}), "tolerance override", required=False)
    values = {**entry, **{k: _number(k, v) for k, v in (overrides or {}).items()}}
    return Tolerances(precision=precision, **values)


def parse_override(text: str) -> tuple[str, float]:
    """'top1_agreement=0.95' -> ('top1_agreement', 0.95), checked (for a CLI option)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"bad tolerance override '{text}'", expected="NAME=VALUE",
                         hint=f"names: {', '.join(field_names())}")
    _check_keys({key: raw}, "tolerance override", required=False)
    try:
        return key, float(raw)
    except ValueError as exc:
        raise UsageError(f"tolerance override '{key}' is not a number", found=raw.strip()) from exc


def _check_keys(values: Mapping[str, Any], source: str, required: bool) -> None:
    known = set(RANGES)
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"{source}: unknown tolerance name(s) {', '.join(unknown)}",
                         expected=", ".join(field_names()), found=", ".join(unknown))
    missing = sorted(known - set(values) - set(OPTIONAL)) if required else []
    if missing:
        raise UsageError(f"{source}: missing tolerance(s) {', '.join(missing)}")


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"tolerance override '{key}' must be a number", found=repr(value))
    return float(value)
