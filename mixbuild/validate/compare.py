"""Run a reference and an artifact side by side and judge the artifact.

    report = validate(reference, artifact, spec, batches, steps=32,
                      tolerances=load_tolerances("fp8"), expert_weights=None)

1. Teacher-forced pass: both runners prefill every batch; logits metrics and perplexity over the
   real (unpadded) positions. When both runners emit the debug outputs (`debug.{i}.router_logits`,
   `debug.{i}.expert_ids`, `debug.{i}.hidden`), per-layer router and hidden-state metrics too.
2. Greedy pass: each runner generates `steps` tokens on its own, with its own KV cache; the
   report counts the leading tokens that agree and names the first divergence with the
   reference's top-1/top-2 logit margin there.
3. Per-expert pass (when `expert_weights` is given and the reference emits `debug.{i}.moe_input`):
   every expert's output error on the reference MoE inputs of the tokens routed to it.

NaN or Inf in either runner's outputs fails the validation: the affected metrics are NaN (which
fails its check), non-finite greedy steps never match, tokens with non-finite router logits
count as flipped, and `Report.non_finite` says what held them and where.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mixbuild.contract import LOGITS, Debug
from mixbuild.errors import ArtifactError, UsageError
from mixbuild.model.spec import MixtralSpec
from mixbuild.progress import track
from mixbuild.runtime.runner import Runner, greedy_steps, prefill_feeds
from mixbuild.validate import metrics as M
from mixbuild.validate.data import Batch
from mixbuild.validate.experts import ExpertWeights, expert_errors
from mixbuild.validate.result import Check, LayerReport, Metrics, Report, Worst
from mixbuild.validate.tolerances import THRESHOLDS, Tolerances


# ----------------------------------------------------------------------------- accumulators
@dataclass
class NonFinite:
    """Where either runner's outputs held NaN or Inf: (runner, output, layer, unit) -> [NaN
    positions, Inf positions, positions looked at]; `messages` gives the report's lines."""

    counts: dict = field(default_factory=dict)

    def add(self, side: str, what: str, values: np.ndarray, layer: int | None = None) -> None:
        """Count the positions (rows) of `values` [N, ...] holding a NaN / an Inf."""
        self.count(side, what, *M.non_finite_counts(values), layer=layer)

    def count(self, side: str, what: str, nan: int, inf: int, total: int,
              layer: int | None = None, unit: str = "positions") -> None:
        entry = self.counts.setdefault((side, what, layer, unit), [0, 0, 0])
        for i, n in enumerate((nan, inf, total)):
            entry[i] += int(n)

    def messages(self) -> tuple[str, ...]:
        lines, layered = [], {}
        for (side, what, layer, unit), (nan, inf, total) in self.counts.items():
            if not nan and not inf:
                continue
            if layer is None:
                lines += _non_finite_lines(f"{side} {what}", nan, inf, total, unit)
            else:  # one line per (runner, output): its first layer
                layered.setdefault((side, what, unit), []).append((layer, nan, inf, total))
        for (side, what, unit), found in layered.items():
            layer, nan, inf, total = min(found)
            more = f" (and {len(found) - 1} later layer(s))" if len(found) > 1 else ""
            lines += _non_finite_lines(f"{side} {what} of layer {layer}{more}", nan, inf, total,
                                       unit)
        return tuple(lines)


def _non_finite_lines(label: str, nan: int, inf: int, total: int, unit: str) -> list[str]:
    return [f"{label} contain {kind} at {count} of {total} {unit}"
            for kind, count in (("NaN", nan), ("Inf", inf)) if count]


@dataclass
class LogitStats:
    """Whole-model logit metrics pooled over batches (every real position of each)."""

    max_abs: float = 0.0
    abs_sum: float = 0.0
    values: int = 0
    cosine: list = field(default_factory=list)
    kl: list = field(default_factory=list)
    top1: list = field(default_factory=list)
    top5: list = field(default_factory=list)
    nll_reference: list = field(default_factory=lambda: [0.0, 0])
    nll_artifact: list = field(default_factory=lambda: [0.0, 0])
    sequences: int = 0
    non_finite: NonFinite = field(default_factory=NonFinite)

    def add(self, batch: Batch, ref_logits: np.ndarray, art_logits: np.ndarray) -> None:
        ref = M.real_positions(ref_logits, batch.attention_mask)
        art = M.real_positions(art_logits, batch.attention_mask)
        self.non_finite.add("reference", "logits", ref)
        self.non_finite.add("artifact", "logits", art)
        self.max_abs = M.pooled_max([self.max_abs, M.max_abs_error(ref, art)])
        self.abs_sum += M.mean_abs_error(ref, art) * ref.size
        self.values += ref.size
        self.cosine.append(M.cosine_similarity(ref, art))
        self.kl.append(M.kl_divergence(ref, art))
        self.top1.append(M.topk_agreement(ref, art, 1))
        self.top5.append(M.topk_agreement(ref, art, 5))
        mask, targets = M.next_token_targets(batch.input_ids, batch.attention_mask)
        for total, logits in ((self.nll_reference, ref_logits), (self.nll_artifact, art_logits)):
            nll, count = M.negative_log_likelihood(logits[:, :-1], targets, mask)
            total[0] += nll
            total[1] += count
        self.sequences += batch.input_ids.shape[0]


@dataclass
class _LayerStats:
    """One layer's debug-output comparison, pooled over batches."""

    hidden: list = field(default_factory=list)
    router: list = field(default_factory=list)
    flips: list = field(default_factory=list)
    near_ties: int = 0
    moe_inputs: list = field(default_factory=list)
    ref_ids: list = field(default_factory=list)

    def add(self, layer: int, ref: dict, art: dict, real: np.ndarray, k: int, near_tie_gap: float,
            keep_moe_inputs: bool, non_finite: NonFinite) -> None:
        tokens = real.reshape(-1)
        hidden, router, moe_input = (kind.name_for(layer) for kind in
                                     (Debug.HIDDEN, Debug.ROUTER_LOGITS, Debug.MOE_INPUT))
        if hidden in ref and hidden in art:
            ref_hidden, art_hidden = ref[hidden][real], art[hidden][real]
            non_finite.add("reference", "hidden states", ref_hidden, layer)
            non_finite.add("artifact", "hidden states", art_hidden, layer)
            self.hidden.append(M.max_abs_error(ref_hidden, art_hidden))
        if router not in ref or router not in art:
            return
        ref_logits, art_logits = ref[router][tokens], art[router][tokens]
        non_finite.add("reference", "router logits", ref_logits, layer)
        non_finite.add("artifact", "router logits", art_logits, layer)
        self.router.append(M.max_abs_error(ref_logits, art_logits))
        ref_ids, art_ids = (_chosen_experts(out, layer, k)[tokens] for out in (ref, art))
        # a token whose router logits are not finite on either side has no trustworthy choice
        flips = M.router_flips(ref_ids, art_ids) | ~(M.finite_rows(ref_logits)
                                                     & M.finite_rows(art_logits))
        self.flips.append(flips)
        self.near_ties += M.near_tie_flips(flips, ref_logits, k, near_tie_gap)
        if keep_moe_inputs and moe_input in ref:
            self.moe_inputs.append(ref[moe_input][tokens])
            self.ref_ids.append(ref_ids)


def _chosen_experts(outputs: dict, layer: int, k: int) -> np.ndarray:
    """debug.{i}.expert_ids, or the top-k of the router logits when a runner gives only those."""
    ids = outputs.get(Debug.EXPERT_IDS.name_for(layer))
    if ids is not None:
        return ids
    return M.routing_from_logits(outputs[Debug.ROUTER_LOGITS.name_for(layer)], k)


@dataclass
class _Greedy:
    steps: int
    match_steps: int = 0
    total_steps: int = 0
    first: M.Divergence | None = None
    sequences: int = 0
    non_finite: NonFinite = field(default_factory=NonFinite)

    def add(self, ref: tuple[np.ndarray, np.ndarray, np.ndarray],
            art: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """ref / art: tokens [B, N], margins [B, N], and per step whether the logits were
        NaN-free and Inf-free [B, N, 2] (`_greedy_tokens`)."""
        (ref_tokens, margins, ref_ok), (art_tokens, _, art_ok) = ref, art
        for side, ok in (("reference", ref_ok), ("artifact", art_ok)):
            self.non_finite.count(side, "logits", (~ok[..., 0]).sum(),
                                  (ok[..., 0] & ~ok[..., 1]).sum(), ok[..., 0].size,
                                  unit="greedy steps")
        valid = ref_ok.all(axis=-1) & art_ok.all(axis=-1)
        self.match_steps += int(M.matching_prefix(ref_tokens, art_tokens, valid).sum())
        self.total_steps += ref_tokens.size
        found = M.greedy_divergence(ref_tokens, art_tokens, margins, valid)
        if found is not None:
            found = dataclasses.replace(found, sequence=found.sequence + self.sequences)
            if self.first is None or found.step < self.first.step:
                self.first = found
        self.sequences += ref_tokens.shape[0]


# ----------------------------------------------------------------------------- passes
def _check_inputs(spec: MixtralSpec, batches: Sequence[Batch], steps: int) -> None:
    if not batches:
        raise UsageError("validation needs at least one batch of evaluation tokens")
    if steps < 0:
        raise UsageError("greedy steps must not be negative", found=str(steps))
    for batch in batches:
        real = batch.input_ids[batch.attention_mask.astype(bool)]
        if real.size and (real.min() < 0 or real.max() >= spec.vocab_size):
            raise UsageError("evaluation token ids are outside the model's vocabulary",
                             expected=f"0 <= id < {spec.vocab_size}",
                             found=f"ids from {real.min()} to {real.max()}",
                             hint="tokenize with the tokenizer.json of the checkpoint being validated")


def _infer_pair(reference: Runner, artifact: Runner, spec: MixtralSpec, batch: Batch, kv_dtype):
    ref = reference.infer(prefill_feeds(spec, batch.input_ids, batch.attention_mask))
    art = artifact.infer(prefill_feeds(spec, batch.input_ids, batch.attention_mask, kv_dtype))
    if art[LOGITS].shape != ref[LOGITS].shape:
        raise ArtifactError(f"{artifact.name}: logits have the wrong shape",
                            expected=str(ref[LOGITS].shape), found=str(art[LOGITS].shape))
    return ref, art


def _teacher_forced(reference, artifact, spec, batches, tolerances, keep_moe_inputs, kv_dtype,
                    progress):
    logits = LogitStats()
    layers = [_LayerStats() for _ in range(spec.num_layers)]
    for batch in track(batches, total=len(batches), label="teacher-forced", enabled=progress):
        ref, art = _infer_pair(reference, artifact, spec, batch, kv_dtype)
        logits.add(batch, ref[LOGITS], art[LOGITS])
        real = batch.attention_mask.astype(bool)
        for i, stats in enumerate(layers):
            stats.add(i, ref, art, real, spec.top_k, tolerances.router_near_tie_gap, keep_moe_inputs,
                      logits.non_finite)
    return logits, layers


def _greedy_tokens(runner: Runner, spec: MixtralSpec, batch: Batch, steps: int, kv_dtype):
    """`steps` greedy tokens [B, steps], the top-1/top-2 logit margins at each step, and per
    step whether the logits held no NaN and no Inf [B, steps, 2] (the argmax of a row with a
    NaN is that NaN's index, so such a step must not count as a match)."""
    tokens, margins, ok = [], [], []
    for _, out in greedy_steps(runner, spec, batch.input_ids, batch.attention_mask, steps - 1,
                               kv_dtype=kv_dtype):
        last = out[LOGITS][:, -1]
        tokens.append(last.argmax(-1))
        margins.append(M.logit_margin(last))
        ok.append(np.stack([~np.isnan(last).any(-1), ~np.isinf(last).any(-1)], axis=-1))
    return np.stack(tokens, axis=1), np.stack(margins, axis=1), np.stack(ok, axis=1)


def _greedy(reference, artifact, spec, batches, steps, kv_dtype, progress) -> _Greedy:
    result = _Greedy(steps)
    if steps == 0:
        return result
    for batch in track(batches, total=len(batches), label="greedy", enabled=progress):
        result.add(_greedy_tokens(reference, spec, batch, steps, np.float32),
                   _greedy_tokens(artifact, spec, batch, steps, kv_dtype))
    return result


def _expert_pass(layers: list[_LayerStats], expert_weights: ExpertWeights, progress):
    """Per layer: (errors [E] with NaN for unused experts, tokens [E]), or None without inputs."""
    results = []
    for i, stats in track(list(enumerate(layers)), label="experts", enabled=progress):
        if not stats.moe_inputs:
            results.append(None)
            continue
        x, ids = np.concatenate(stats.moe_inputs), np.concatenate(stats.ref_ids)
        results.append(expert_errors(x, ids, expert_weights.reference(i), expert_weights.artifact(i)))
    return results


# ----------------------------------------------------------------------------- assembly
def _layer_report(index: int, stats: _LayerStats, experts) -> LayerReport:
    flips = np.concatenate(stats.flips) if stats.flips else None
    errors, counts = experts if experts is not None else ((), ())
    return LayerReport(
        layer=index,
        hidden_max_abs=M.pooled_max(stats.hidden),
        router_logits_max_abs=M.pooled_max(stats.router),
        router_flip_rate=float(flips.mean()) if flips is not None and flips.size else None,
        router_flips=int(flips.sum()) if flips is not None else None,
        near_tie_flips=stats.near_ties if flips is not None else None,
        tokens=int(flips.size) if flips is not None else 0,
        # None for an expert no token chose; a chosen expert's NaN error stays NaN
        expert_max_abs=tuple(None if c == 0 else float(e) for e, c in zip(errors, counts)),
        expert_tokens=tuple(int(c) for c in counts))


def _metrics(logits: LogitStats, greedy: _Greedy, layers: tuple[LayerReport, ...]) -> Metrics:
    ppl_ref = M.perplexity_from_nll(*logits.nll_reference)
    ppl_art = M.perplexity_from_nll(*logits.nll_artifact)
    rates = [lr.router_flip_rate for lr in layers if lr.router_flip_rate is not None]
    flips = sum(lr.router_flips or 0 for lr in layers)
    routed = sum(lr.tokens for lr in layers)
    cat = np.concatenate
    top1 = cat(logits.top1)
    return Metrics(
        positions=int(sum(c.size for c in logits.cosine)), sequences=logits.sequences,
        logits_max_abs=logits.max_abs, logits_mean_abs=logits.abs_sum / max(logits.values, 1),
        logits_cosine_min=float(cat(logits.cosine).min()), kl_mean=float(cat(logits.kl).mean()),
        kl_max=float(cat(logits.kl).max()), top1_agreement=float(top1.mean()),
        top5_agreement=float(cat(logits.top5).mean()), ppl_reference=ppl_ref,
        ppl_artifact=ppl_art, ppl_rel_delta=M.relative_delta(ppl_ref, ppl_art),
        greedy_steps=greedy.total_steps, greedy_match_steps=greedy.match_steps,
        greedy_match_fraction=(greedy.match_steps / greedy.total_steps if greedy.total_steps
                               else None),
        first_divergence=greedy.first,
        router_flip_rate=max(rates) if rates else None,
        router_flip_rate_mean=flips / routed if routed else None,
        # a non-finite position counts as a disagreement
        top1_agreement_ci95=M.wilson_interval(int(np.nansum(top1)), int(top1.size)))


def _checks(metrics: Metrics, tolerances: Tolerances) -> tuple[tuple[Check, ...], tuple[str, ...]]:
    """A check per threshold that could be measured; the names that could not be are skipped."""
    checks, skipped = [], []
    for name in THRESHOLDS:
        value = getattr(metrics, name)
        if value is None:
            skipped.append(name)
        else:
            checks.append(tolerances.check(name, value))
    return tuple(checks), tuple(skipped)


def worst_location(layers: Sequence[LayerReport]) -> Worst | None:
    """The first layer whose hidden-state error is not finite (NaN or Inf on either side);
    else the (layer, expert) with the largest expert output error; without a non-zero expert
    error, the layer whose hidden-state error grew the most over the previous layer's. None
    when there is nothing to point at (no per-layer data, or no error anywhere)."""
    return _first_non_finite(layers) or _worst_expert(layers) or _worst_hidden_growth(layers)


def _first_non_finite(layers: Sequence[LayerReport]) -> Worst | None:
    for lr in layers:
        if lr.hidden_max_abs is not None and not np.isfinite(lr.hidden_max_abs):
            return Worst(layer=lr.layer, expert=None, value=lr.hidden_max_abs,
                         basis="hidden_non_finite")
    return None


def _worst_expert(layers: Sequence[LayerReport]) -> Worst | None:
    found = [(value, lr.layer, expert) for lr in layers
             for expert, value in enumerate(lr.expert_max_abs) if value is not None]
    bad = [t for t in found if not np.isfinite(t[0])]
    if bad:  # a NaN / Inf expert error is the worst there is (max() would not see a NaN)
        value, layer, expert = bad[0]
        return Worst(layer=layer, expert=expert, value=value, basis="expert_max_abs")
    if not found or max(found)[0] <= 0.0:
        return None
    value, layer, expert = max(found, key=lambda t: t[0])
    return Worst(layer=layer, expert=expert, value=value, basis="expert_max_abs")


def _worst_hidden_growth(layers: Sequence[LayerReport]) -> Worst | None:
    hidden = [(lr.layer, lr.hidden_max_abs) for lr in layers if lr.hidden_max_abs is not None]
    growth = [(layer, value - (hidden[j - 1][1] if j else 0.0))
              for j, (layer, value) in enumerate(hidden)]
    if not growth or max(g for _, g in growth) <= 0.0:
        return None
    layer, value = max(growth, key=lambda t: t[1])
    return Worst(layer=layer, expert=None, value=value, basis="hidden_growth")


def validate(reference: Runner, artifact: Runner, spec: MixtralSpec, batches: Sequence[Batch],
             steps: int, tolerances: Tolerances, expert_weights: ExpertWeights | None = None, *,
             artifact_kv_dtype=np.float32, progress: bool = False) -> Report:
    """Judge `artifact` against `reference` on `batches` (see data.evaluation_batches).

    steps: greedy tokens generated per sequence (0 skips the greedy pass). tolerances: from
    load_tolerances(precision). expert_weights: optional ExpertWeights for per-expert errors
    (needs `debug.{i}.moe_input` from the reference, e.g. HFRunner(moe_inputs=True)).
    artifact_kv_dtype: dtype of the artifact's past key/value feeds. Metrics a runner cannot
    provide are skipped and listed in `Report.skipped`; `passed` covers the measured checks.
    """
    batches = list(batches)
    _check_inputs(spec, batches, steps)
    logits, layer_stats = _teacher_forced(reference, artifact, spec, batches, tolerances,
                                          expert_weights is not None, artifact_kv_dtype, progress)
    experts = (_expert_pass(layer_stats, expert_weights, progress) if expert_weights is not None
               else [None] * spec.num_layers)
    layers = tuple(_layer_report(i, s, e) for i, (s, e) in enumerate(zip(layer_stats, experts)))
    greedy = _greedy(reference, artifact, spec, batches, steps, artifact_kv_dtype, progress)
    metrics = _metrics(logits, greedy, layers)
    checks, skipped = _checks(metrics, tolerances)
    if expert_weights is not None and all(e is None for e in experts):
        skipped += ("expert_max_abs",)
    non_finite = logits.non_finite.messages() + greedy.non_finite.messages() + tuple(
        f"expert output error of layer {lr.layer}, expert {e} is not finite ({value})"
        for lr in layers for e, value in enumerate(lr.expert_max_abs)
        if value is not None and not np.isfinite(value))
    return Report(passed=all(c.passed for c in checks) and not non_finite,
                  precision=tolerances.precision.value, backend=artifact.name,
                  reference=reference.name, metrics=metrics, layers=layers, checks=checks,
                  worst=worst_location(layers), skipped=skipped, non_finite=non_finite)
