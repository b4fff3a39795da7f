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
from mixbuild.validate import metrics as M
from mixbuild.validate.data import Batch
from mixbuild.validate.experts import ExpertWeights, expert_errors
from mixbuild.validate.result import Check, LayerReport, Metrics, Report, Worst
from mixbuild.validate.tolerances import THRESHOLDS, Tolerances

# the most reference MoE-input rows kept per layer for the per-expert pass (bounds memory on
# long inputs: rows x hidden x layers floats)
MAX_EXPERT_ROWS = 16384


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
    """Whole-model logit metrics pooled over batches (every real position of each), with the
    per-position values the confidence intervals need and each position's sequence (positions
    of one sequence are correlated: intervals treat sequences as clusters)."""

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
    position_sequence: list = field(default_factory=list)   # per compared position
    nll_diff: list = field(default_factory=list)            # per predicted token: art - ref
    nll_sequence: list = field(default_factory=list)

    def add(self, batch: Batch, ref_logits: np.ndarray, art_logits: np.ndarray, start: int = 0,
            count_sequences: bool = True) -> None:
        """Logits [B, n, V] of columns start .. start+n of `batch` (the whole batch by default)."""
        n = ref_logits.shape[1]
        cols = slice(start, start + n)
        mask = batch.attention_mask[:, cols]
        ref = M.real_positions(ref_logits, mask)
        art = M.real_positions(art_logits, mask)
        rows = np.broadcast_to(np.arange(mask.shape[0])[:, None] + self.sequences, mask.shape)
        self.position_sequence.append(rows[mask.astype(bool)])
        self.non_finite.add("reference", "logits", ref)
        self.non_finite.add("artifact", "logits", art)
        self.max_abs = M.pooled_max([self.max_abs, M.max_abs_error(ref, art)])
        self.abs_sum += M.mean_abs_error(ref, art) * ref.size
        self.values += ref.size
        self.cosine.append(M.cosine_similarity(ref, art))
        self.kl.append(M.kl_divergence(ref, art))
        self.top1.append(M.topk_agreement(ref, art, 1))
        self.top5.append(M.topk_agreement(ref, art, 5))
        # column j predicts column j+1 (the next chunk's first token for the chunk's last one)
        full_mask, full_ids = batch.attention_mask.astype(bool), batch.input_ids
        nxt = slice(start + 1, start + n + 1)
        targets = np.zeros(mask.shape, np.int64)
        predicts = np.zeros(mask.shape, bool)
        width = full_ids[:, nxt].shape[1]
        targets[:, :width] = full_ids[:, nxt]
        predicts[:, :width] = full_mask[:, cols][:, :width] & full_mask[:, nxt]
        per_side = []
        for total, logits in ((self.nll_reference, ref_logits), (self.nll_artifact, art_logits)):
            nll, count = M.negative_log_likelihood(logits, targets, predicts)
            total[0] += nll
            total[1] += count
            per_side.append(M.token_nll(logits, targets, predicts))
        self.nll_diff.append(per_side[1] - per_side[0])
        self.nll_sequence.append(rows[predicts])
        if count_sequences:
            self.sequences += batch.input_ids.shape[0]


@dataclass
class _LayerStats:
    """One layer's debug-output comparison, pooled over batches."""

    hidden: list = field(default_factory=list)
    hidden_sq: list = field(default_factory=lambda: [0.0, 0.0])      # sum |d|^2, sum |ref|^2
    moe_in: list = field(default_factory=list)
    moe_in_sq: list = field(default_factory=lambda: [0.0, 0.0])
    router: list = field(default_factory=list)
    flips: list = field(default_factory=list)
    near_ties: int = 0
    moe_inputs: list = field(default_factory=list)
    ref_ids: list = field(default_factory=list)
    kept_rows: int = 0

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
            _add_squares(self.hidden_sq, ref_hidden, art_hidden)
        if moe_input in ref and moe_input in art:
            ref_in, art_in = ref[moe_input][tokens], art[moe_input][tokens]
            self.moe_in.append(M.max_abs_error(ref_in, art_in))
            _add_squares(self.moe_in_sq, ref_in, art_in)
        if router not in ref or router not in art:
            return
        ref_logits, art_logits = ref[router][tokens], art[router][tokens]
        non_finite.add("reference", "router logits", ref_logits, layer)
        non_finite.add("artifact", "router logits", art_logits, layer)
        self.router.append(M.max_abs_error(ref_logits, art_logits))
        ref_ids, art_ids = (_chosen_experts(out, layer, k)[tokens] for out in (ref, art))
        # a token whose router logits are not finite on either side has no trustworthy choice
        finite = M.finite_rows(ref_logits) & M.finite_rows(art_logits)
        flips = M.router_flips(ref_ids, art_ids) | ~finite
        self.flips.append(flips)
        # a non-finite flip is never excused as a near tie
        self.near_ties += M.near_tie_flips(flips & finite, ref_logits, k, near_tie_gap)
        if keep_moe_inputs and moe_input in ref and self.kept_rows < MAX_EXPERT_ROWS:
            take = MAX_EXPERT_ROWS - self.kept_rows
            self.moe_inputs.append(ref[moe_input][tokens][:take])
            self.ref_ids.append(ref_ids[:take])
            self.kept_rows += len(self.ref_ids[-1])


def _add_squares(total: list, ref: np.ndarray, art: np.ndarray) -> None:
    ref64 = ref.astype(np.float64)
    total[0] += float(((art.astype(np.float64) - ref64) ** 2).sum())
    total[1] += float((ref64 ** 2).sum())


def _relative(total: list) -> float | None:
    diff, ref = total
    if ref == 0.0:
        return None if diff == 0.0 else float("inf")
    return float(np.sqrt(diff / ref))


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


def as_model(runner, spec: MixtralSpec, kv_dtype=np.float32):
    """A runner as the passes drive it (mixbuild.validate.passes): a concat-layout Runner is
    wrapped; a PassModel (ServingModel) is used as it is."""
    from mixbuild.validate.passes import ConcatModel, PassModel

    if isinstance(runner, PassModel):
        return runner

    return ConcatModel(runner, spec, kv_dtype)


def _teacher_forced(reference, artifact, spec, batches, tolerances, keep_moe_inputs, progress,
                    chunk=None):
    logits = LogitStats()
    layers = [_LayerStats() for _ in range(spec.num_layers)]
    for batch in track(batches, total=len(batches), label="teacher-forced", enabled=progress):
        pairs = zip(reference.teacher_forced(batch, chunk), artifact.teacher_forced(batch, chunk))
        for (start, stop, ref), (_, _, art) in pairs:
            expected = (batch.input_ids.shape[0], stop - start, spec.vocab_size)
            if art[LOGITS].shape != expected:
                raise ArtifactError(f"{artifact.name}: logits have the wrong shape",
                                    expected=str(expected), found=str(art[LOGITS].shape))
            logits.add(batch, ref[LOGITS], art[LOGITS], start, count_sequences=False)
            real = batch.attention_mask[:, start:stop].astype(bool)
            for i, stats in enumerate(layers):
                stats.add(i, ref, art, real, spec.top_k, tolerances.router_near_tie_gap,
                          keep_moe_inputs, logits.non_finite)
        logits.sequences += batch.input_ids.shape[0]
    return logits, layers


def _greedy(reference, artifact, spec, batches, steps, progress) -> _Greedy:
    result = _Greedy(steps)
    if steps == 0:
        return result
    for batch in track(batches, total=len(batches), label="greedy", enabled=progress):
        result.add(reference.greedy(batch, steps), artifact.greedy(batch, steps))
    return result


def _expert_pass(layers: list[_LayerStats], expert_weights: ExpertWeights, progress):
    """Per layer: (errors [E] with NaN for unused experts, tokens [E], relative errors [E]), or
    None without inputs."""
    results = []
    for i, stats in track(list(enumerate(layers)), label="experts", enabled=progress):
        if not stats.moe_inputs:
            results.append(None)
            continue
        x, ids = np.concatenate(stats.moe_inputs), np.concatenate(stats.ref_ids)
        results.append(expert_errors(x, ids, expert_weights.reference(i), expert_weights.artifact(i),
                                     relative=True))
    return results


# ----------------------------------------------------------------------------- assembly
def _layer_report(index: int, stats: _LayerStats, experts, near_tie_gap: float) -> LayerReport:
    flips = np.concatenate(stats.flips) if stats.flips else None
    errors, counts, rel = experts if experts is not None else ((), (), ())
    clear = int(flips.sum()) - stats.near_ties if flips is not None else None
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
        expert_tokens=tuple(int(c) for c in counts),
        hidden_rel_error=_relative(stats.hidden_sq) if stats.hidden else None,
        moe_input_max_abs=M.pooled_max(stats.moe_in),
        moe_input_rel_error=_relative(stats.moe_in_sq) if stats.moe_in else None,
        clear_flips=clear,
        expert_rel_error=tuple(None if c == 0 else float(r) for r, c in zip(rel, counts)))


def _metrics(logits: LogitStats, greedy: _Greedy, layers: tuple[LayerReport, ...]) -> Metrics:
    ppl_ref = M.perplexity_from_nll(*logits.nll_reference)
    ppl_art = M.perplexity_from_nll(*logits.nll_artifact)
    rates = [lr.router_flip_rate for lr in layers if lr.router_flip_rate is not None]
    flips = sum(lr.router_flips or 0 for lr in layers)
    routed = sum(lr.tokens for lr in layers)
    cat = np.concatenate
    top1 = cat(logits.top1)
    kl, sequence = cat(logits.kl), cat(logits.position_sequence)
    diff, diff_sequence = cat(logits.nll_diff), cat(logits.nll_sequence)
    clear = [(lr.clear_flips / lr.tokens, lr) for lr in layers
             if lr.clear_flips is not None and lr.tokens]
    worst_clear = max(clear, key=lambda t: t[0], default=None)
    return Metrics(
        positions=int(sum(c.size for c in logits.cosine)), sequences=logits.sequences,
        logits_max_abs=logits.max_abs, logits_mean_abs=logits.abs_sum / max(logits.values, 1),
        logits_cosine_min=float(cat(logits.cosine).min()), kl_mean=float(kl.mean()),
        kl_max=float(kl.max()), top1_agreement=float(top1.mean()),
        top5_agreement=float(cat(logits.top5).mean()), ppl_reference=ppl_ref,
        ppl_artifact=ppl_art, ppl_rel_delta=M.relative_delta(ppl_ref, ppl_art),
        greedy_steps=greedy.total_steps, greedy_match_steps=greedy.match_steps,
        greedy_match_fraction=(greedy.match_steps / greedy.total_steps if greedy.total_steps
                               else None),
        first_divergence=greedy.first,
        router_flip_rate=max(rates) if rates else None,
        router_flip_rate_mean=flips / routed if routed else None,
        # a non-finite position counts as a disagreement
        top1_agreement_ci95=M.wilson_interval(int(np.nansum(top1)), int(top1.size)),
        kl_mean_ci95=M.clustered_mean_interval(kl, sequence),
        ppl_rel_delta_ci95=M.ppl_delta_interval(diff, diff_sequence),
        router_clear_flip_rate=worst_clear[0] if worst_clear else None,
        router_clear_flip_rate_ci95=(M.wilson_interval(worst_clear[1].clear_flips,
                                                       worst_clear[1].tokens)
                                     if worst_clear else None),
        router_clear_flip_layer=worst_clear[1].layer if worst_clear else None,
        expert_rel_error=_largest_finite(x for lr in layers for x in lr.expert_rel_error),
        expert_rel_error_at=_largest_expert(layers))


def _largest_finite(values) -> float | None:
    """The largest finite value (NaN / Inf expert errors are reported through
    Report.non_finite, which fails the report by itself); None for none."""
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    return max(finite) if finite else None


def _largest_expert(layers) -> tuple[int, int] | None:
    found = [(x, lr.layer, e) for lr in layers for e, x in enumerate(lr.expert_rel_error)
             if x is not None and np.isfinite(x)]
    return tuple(max(found)[1:]) if found else None


# check name -> (the Metrics field judged, the Metrics field holding its 95% interval)
_JUDGED = {"top1_agreement": ("top1_agreement", "top1_agreement_ci95"),
           "kl_mean": ("kl_mean", "kl_mean_ci95"),
           "ppl_rel_delta": ("ppl_rel_delta", "ppl_rel_delta_ci95"),
           "router_flip_rate": ("router_clear_flip_rate", "router_clear_flip_rate_ci95")}


def _checks(metrics: Metrics, tolerances: Tolerances) -> tuple[tuple[Check, ...], tuple[str, ...]]:
    """A check per threshold that could be measured; the names that could not be are skipped.
    Sampled metrics are judged on the unfavourable end of their 95% interval
    (tolerances.Tolerances.check)."""
    checks, skipped = [], []
    for name in THRESHOLDS:
        value_field, interval_field = _JUDGED.get(name, (name, None))
        value = getattr(metrics, value_field)
        if name == "expert_rel_error" and (value is None or not np.isfinite(tolerances.expert_rel_error)):
            continue   # only with expert weights (listed as skipped by validate when unmeasured)
        if value is None:
            skipped.append(name)
        else:
            interval = getattr(metrics, interval_field) if interval_field else None
            checks.append(tolerances.check(name, value, interval))
    return tuple(checks), tuple(skipped)


def worst_location(layers: Sequence[LayerReport]) -> Worst | None:
    """Where the error most likely comes from:

    1. the first layer whose hidden-state error is not finite (NaN or Inf on either side);
    2. a NaN / Inf expert output error;
    3. an expert whose relative output error is an outlier (OUTLIER_FACTOR times the median
       of all experts'): a damaged expert, or the worst expert of a damaged layer;
    4. with the artifact's MoE inputs measured (relative errors of every layer's input, MoE
       input and output), the stage that added the most relative error: a layer's attention
       (its MoE input's error minus its input's) or its MoE (its output's minus its MoE
       input's), the MoE stage naming its expert with the largest relative output error;
    5. else the (layer, expert) with the largest expert output error, then the layer whose
       hidden-state error grew the most over the previous layer's.
    None when there is nothing to point at (no per-layer data, or no error anywhere)."""
    return (_first_non_finite(layers) or _non_finite_expert(layers) or _expert_outlier(layers)
            or _worst_stage(layers) or _worst_expert(layers) or _worst_hidden_growth(layers))


# an expert whose relative output error is this many times the median of all experts' is the
# culprit: quantization spreads its error evenly over experts (within ~1.5x of the median on
# the fixture at fp8 and int4), a damaged expert or layer stands out
OUTLIER_FACTOR = 3.0


def _expert_outlier(layers: Sequence[LayerReport]) -> Worst | None:
    found = [(x, lr.layer, e) for lr in layers for e, x in enumerate(lr.expert_rel_error)
             if x is not None and np.isfinite(x)]
    if len(found) < 2:
        return None
    median = float(np.median([x for x, _, _ in found]))
    value, layer, expert = max(found)
    if not value > OUTLIER_FACTOR * median:
        return None
    return Worst(layer=layer, expert=expert, value=value, basis="expert_rel_error")


def _first_non_finite(layers: Sequence[LayerReport]) -> Worst | None:
    for lr in layers:
        if lr.hidden_max_abs is not None and not np.isfinite(lr.hidden_max_abs):
            return Worst(layer=lr.layer, expert=None, value=lr.hidden_max_abs,
                         basis="hidden_non_finite")
    return None


def _non_finite_expert(layers: Sequence[LayerReport]) -> Worst | None:
    for lr in layers:
        for expert, value in enumerate(lr.expert_max_abs):
            if value is not None and not np.isfinite(value):
                return Worst(layer=lr.layer, expert=expert, value=value, basis="expert_max_abs")
    return None


def _worst_stage(layers: Sequence[LayerReport]) -> Worst | None:
    if not layers or any(lr.moe_input_rel_error is None or lr.hidden_rel_error is None
                         for lr in layers):
        return None
    stages, before = [], 0.0
    for lr in layers:
        stages.append((lr.moe_input_rel_error - before, lr, "attention_growth"))
        stages.append((lr.hidden_rel_error - lr.moe_input_rel_error, lr, "moe_growth"))
        before = lr.hidden_rel_error
    value, lr, basis = max(stages, key=lambda t: t[0])
    if not value > 0.0:
        return None
    expert = None
    if basis == "moe_growth":
        rel = [(x, e) for e, x in enumerate(lr.expert_rel_error) if x is not None]
        expert = max(rel)[1] if rel else None
    return Worst(layer=lr.layer, expert=expert, value=float(value), basis=basis)


def _worst_expert(layers: Sequence[LayerReport]) -> Worst | None:
    found = [(value, lr.layer, expert) for lr in layers
             for expert, value in enumerate(lr.expert_max_abs) if value is not None]
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


def validate(reference, artifact, spec: MixtralSpec, batches: Sequence[Batch],
             steps: int, tolerances: Tolerances, expert_weights: ExpertWeights | None = None, *,
             artifact_kv_dtype=np.float32, progress: bool = False,
             chunk: int | None = None) -> Report:
    """Judge `artifact` against `reference` on `batches` (see data.evaluation_batches).

    reference / artifact: Runners of the concat layout, or models of mixbuild.validate.passes
    (ServingModel for a serving-layout artifact). steps: greedy tokens generated per sequence
    (0 skips the greedy pass). tolerances: from load_tolerances(precision). expert_weights:
    optional ExpertWeights for per-expert errors (needs `debug.{i}.moe_input` from the
    reference, e.g. HFRunner(moe_inputs=True)). artifact_kv_dtype: dtype of the artifact's
    past key/value feeds. chunk: compare long sequences `chunk` columns at a time, feeding the
    KV cache (None: each batch in one call). Metrics a runner cannot provide are skipped and
    listed in `Report.skipped`; `passed` covers the measured checks.
    """
    batches = list(batches)
    _check_inputs(spec, batches, steps)
    if chunk is not None and chunk < 1:
        raise UsageError("the chunk length must be at least 1", found=str(chunk))
    ref_model, art_model = as_model(reference, spec), as_model(artifact, spec, artifact_kv_dtype)
    logits, layer_stats = _teacher_forced(ref_model, art_model, spec, batches, tolerances,
                                          expert_weights is not None, progress, chunk)
    experts = (_expert_pass(layer_stats, expert_weights, progress) if expert_weights is not None
               else [None] * spec.num_layers)
    layers = tuple(_layer_report(i, s, e, tolerances.router_near_tie_gap)
                   for i, (s, e) in enumerate(zip(layer_stats, experts)))
    greedy = _greedy(ref_model, art_model, spec, batches, steps, progress)
    metrics = _metrics(logits, greedy, layers)
    checks, skipped = _checks(metrics, tolerances)
    if expert_weights is not None and all(e is None for e in experts):
        skipped += ("expert_rel_error",)
    non_finite = logits.non_finite.messages() + greedy.non_finite.messages() + tuple(
        f"expert output error of layer {lr.layer}, expert {e} is not finite ({value})"
        for lr in layers for e, value in enumerate(lr.expert_max_abs)
        if value is not None and not np.isfinite(value))
    return Report(passed=all(c.passed for c in checks) and not non_finite,
                  precision=tolerances.precision.value, backend=artifact.name,
                  reference=reference.name, metrics=metrics, layers=layers, checks=checks,
                  worst=worst_location(layers), skipped=skipped, non_finite=non_finite)
