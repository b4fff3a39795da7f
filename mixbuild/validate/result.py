"""What a validation run found: frozen dataclasses, JSON-ready through `to_dict`.

`compare.validate` builds a Report; `report` writes and prints it. Values that could not be
measured are None (NaN never reaches report.json).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mixbuild.validate.metrics import Divergence


@dataclass(frozen=True)
class Check:
    """One metric against its tolerance: `value bound threshold` must hold ('<=', '>=', '|x| <=')."""

    name: str
    value: float | None
    threshold: float
    bound: str
    passed: bool
    # what was compared with the threshold: the measured value, or for a sampled metric the
    # unfavourable end of its 95% interval ('lower95' / 'upper95' / 'far95')
    judged: float | None = None
    statistic: str = "value"
    interval: tuple[float, float] | None = None


@dataclass(frozen=True)
class Metrics:
    """Whole-model metrics over every real (unpadded) position of the evaluation batches."""

    positions: int
    sequences: int
    logits_max_abs: float
    logits_mean_abs: float
    logits_cosine_min: float
    kl_mean: float
    kl_max: float
    top1_agreement: float
    top5_agreement: float
    ppl_reference: float
    ppl_artifact: float
    ppl_rel_delta: float
    greedy_steps: int
    greedy_match_steps: int
    greedy_match_fraction: float | None
    first_divergence: Divergence | None
    router_flip_rate: float | None = None       # worst layer
    router_flip_rate_mean: float | None = None  # pooled over layers
    top1_agreement_ci95: tuple[float, float] | None = None  # Wilson interval over `positions`
    kl_mean_ci95: tuple[float, float] | None = None          # sequences as clusters
    ppl_rel_delta_ci95: tuple[float, float] | None = None    # paired per-token NLL differences
    # routing flips on tokens that were not near ties in the reference: the worst layer
    router_clear_flip_rate: float | None = None
    router_clear_flip_rate_ci95: tuple[float, float] | None = None
    router_clear_flip_layer: int | None = None
    # the largest finite relative expert output error, and its (layer, expert)
    expert_rel_error: float | None = None
    expert_rel_error_at: tuple[int, int] | None = None


@dataclass(frozen=True)
class LayerReport:
    """MoE-aware metrics of one decoder layer (None where a runner gave no debug output).

    expert_max_abs[e] is expert e's output error on the reference MoE inputs of the tokens the
    reference routed to it (None when no token went there or no expert weights were given)."""

    layer: int
    hidden_max_abs: float | None
    router_logits_max_abs: float | None
    router_flip_rate: float | None
    router_flips: int | None
    near_tie_flips: int | None
    tokens: int
    expert_max_abs: tuple[float | None, ...] = ()
    expert_tokens: tuple[int, ...] = ()
    # relative (Frobenius) errors: the layer's output hidden state and its MoE input (the
    # artifact's against the reference's, over the real tokens), and each expert's output on
    # the reference MoE inputs; None where not measured
    hidden_rel_error: float | None = None
    moe_input_max_abs: float | None = None
    moe_input_rel_error: float | None = None
    clear_flips: int | None = None          # flips that were not near ties
    expert_rel_error: tuple[float | None, ...] = ()


@dataclass(frozen=True)
class Worst:
    """Where the error most likely comes from (compare.worst_location).

    basis 'hidden_non_finite': the first layer whose hidden-state error is NaN or Inf (expert
    None); 'attention_growth': the layer whose attention added the most relative error (its
    MoE input's minus its input's; expert None); 'moe_growth': the layer whose MoE added the
    most, with its expert of largest relative output error; 'expert_max_abs': the (layer,
    expert) with the largest expert output error (no MoE inputs from the artifact, or a NaN
    one); 'expert_rel_error': an expert whose relative output error is an outlier among all
    experts' (a damaged expert, or the worst of a damaged layer);
    'hidden_growth': no expert errors, so the layer whose output error grew most over its
    input's (expert is None)."""

    layer: int
    expert: int | None
    value: float
    basis: str


@dataclass(frozen=True)
class Report:
    passed: bool
    precision: str
    backend: str
    reference: str
    metrics: Metrics
    layers: tuple[LayerReport, ...]
    checks: tuple[Check, ...]
    worst: Worst | None
    skipped: tuple[str, ...] = ()
    # what held NaN or Inf, e.g. "artifact logits contain NaN at 12 of 96 positions"; any
    # entry fails the report, whatever the checks say
    non_finite: tuple[str, ...] = ()
    # what the runtime ran instead of the artifact's own bodies (OrtRunner.kernels), if anything
    kernels: dict[str, Any] | None = None

    @property
    def failed_checks(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def to_dict(self) -> dict[str, Any]:
        """The report.json document: plain JSON types, NaN and infinities as None."""
        return _clean(dataclasses.asdict(self))


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return _clean(value.item())
    return value
