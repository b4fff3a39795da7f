"""Numerical comparison metrics: small pure numpy functions with no model knowledge.

Shape legend: N = compared positions, V = vocab, T = tokens, E = experts, k = experts per token.
Logits arguments are [N, V] arrays of the positions to compare (padding already removed, see
`real_positions`), the reference first and the artifact second. Reductions over positions that
feed an accumulated metric (KL, cosine, agreement) return per-position arrays, so callers can
pool several batches before averaging.

Non-finite values never score well: a position whose logits (either side) hold NaN or Inf gets
NaN for its cosine, KL and top-k agreement, the error metrics are NaN when any value is not
finite, and a NaN fails every tolerance check (`tolerances.Tolerances.check`). Pool with
`pooled_max` / numpy reductions, which propagate NaN, never with Python's `max`, which does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# ----------------------------------------------------------------------------- helpers
def real_positions(values: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Rows of `values` [B, S, ...] where the mask [B, S] is set, flattened to [N, ...]."""
    return values[attention_mask.astype(bool)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, computed in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _rows(values: np.ndarray) -> np.ndarray:
    """[N, ...] -> [N, M] (M = the product of the other dims)."""
    values = np.asarray(values)
    return values.reshape(values.shape[0], int(np.prod(values.shape[1:], dtype=np.int64)))


def finite_rows(values: np.ndarray) -> np.ndarray:
    """Per position, whether all its values are finite: [N, ...] -> [N] bool."""
    return np.isfinite(_rows(values)).all(axis=-1)


def non_finite_counts(values: np.ndarray) -> tuple[int, int, int]:
    """(positions holding a NaN, positions holding an Inf but no NaN, positions) of [N, ...]."""
    flat = _rows(values)
    nan = np.isnan(flat).any(axis=-1)
    inf = np.isinf(flat).any(axis=-1) & ~nan
    return int(nan.sum()), int(inf.sum()), int(flat.shape[0])


def pooled_max(values) -> float | None:
    """The largest of per-batch maxima, NaN if any is NaN (Python's max drops a NaN that is not
    first); None for no values."""
    values = [float(v) for v in values]
    if not values:
        return None
    return float("nan") if any(np.isnan(v) for v in values) else max(values)


def topk_ids(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values along the last axis, largest first, ties to the lower id."""
    return np.argsort(-values, axis=-1, kind="stable")[..., :k]


# ----------------------------------------------------------------------------- logits
def max_abs_error(reference: np.ndarray, artifact: np.ndarray) -> float:
    """Largest absolute elementwise difference (0.0 for empty inputs; NaN when either side holds
    a NaN or an Inf: the error is then not measurable). Used for logits, router logits and
    hidden states alike."""
    if reference.size == 0:
        return 0.0
    if not (np.isfinite(reference).all() and np.isfinite(artifact).all()):
        return float("nan")
    return float(np.abs(reference.astype(np.float64) - artifact.astype(np.float64)).max())


def mean_abs_error(reference: np.ndarray, artifact: np.ndarray) -> float:
    """Mean absolute elementwise difference (0.0 for empty inputs, NaN when a value is not
    finite)."""
    if reference.size == 0:
        return 0.0
    if not (np.isfinite(reference).all() and np.isfinite(artifact).all()):
        return float("nan")
    return float(np.abs(reference.astype(np.float64) - artifact.astype(np.float64)).mean())


def cosine_similarity(reference: np.ndarray, artifact: np.ndarray) -> np.ndarray:
    """Cosine similarity of each position's vectors: [N, V] x [N, V] -> [N].

    Two zero vectors are identical (1.0); a zero vector against a non-zero one scores 0.0; a
    position where either side holds NaN or Inf is NaN.
    """
    ok = finite_rows(reference) & finite_rows(artifact)
    a = np.where(ok[:, None], reference.astype(np.float64), 0.0)
    b = np.where(ok[:, None], artifact.astype(np.float64), 0.0)
    dot = (a * b).sum(axis=-1)
    norm_a, norm_b = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    norms = norm_a * norm_b
    cos = np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)
    cos = np.where((norm_a == 0) & (norm_b == 0), 1.0, np.clip(cos, -1.0, 1.0))
    return np.where(ok, cos, np.nan)


def cosine_min(reference: np.ndarray, artifact: np.ndarray) -> float:
    """The smallest per-position cosine similarity (1.0 when there are no positions, NaN when
    any position is NaN)."""
    cos = cosine_similarity(reference, artifact)
    return float(cos.min()) if cos.size else 1.0


def kl_divergence(reference: np.ndarray, artifact: np.ndarray) -> np.ndarray:
    """KL(reference || artifact) of the next-token distributions at each position: [N, V] -> [N].

    Both sides go through a float64 log-softmax; the sum runs over the reference's support, so
    a token the reference gives probability 0 contributes nothing. Never negative; NaN at a
    position where either side holds NaN or Inf.
    """
    ok = finite_rows(reference) & finite_rows(artifact)
    log_p = log_softmax(np.where(ok[:, None], reference, 0.0))
    log_q = log_softmax(np.where(ok[:, None], artifact, 0.0))
    p = np.exp(log_p)
    kl = (p * (log_p - log_q)).sum(axis=-1)
    return np.where(ok, np.maximum(kl, 0.0), np.nan)


def topk_agreement(reference: np.ndarray, artifact: np.ndarray, k: int) -> np.ndarray:
    """Per position, the overlap of the two top-k token sets divided by k: [N, V] -> [N] in [0, 1].

    For k = 1 this is 1.0 where the argmax tokens agree and 0.0 where they differ; the mean over
    positions is the top-k agreement. Ties go to the lower token id on both sides. A position
    where either side holds NaN or Inf is NaN (argsort would rank NaN as it pleases: an all-NaN
    row has "top-1" token 0 on both sides, which must not count as agreement).
    """
    k = min(k, reference.shape[-1])
    ok = finite_rows(reference) & finite_rows(artifact)
    ref, art = topk_ids(reference, k), topk_ids(artifact, k)
    hits = (ref[:, :, None] == art[:, None, :]).any(axis=-1).sum(axis=-1)
    return np.where(ok, hits / float(k), np.nan)


# ----------------------------------------------------------------------------- perplexity
def next_token_targets(input_ids: np.ndarray, attention_mask: np.ndarray):
    """Align a prefill with its own next tokens.

    Returns (positions [B, S-1] bool, targets [B, S-1]): logits[:, :-1] predict input_ids[:, 1:],
    and a position counts only where both the predicting and the predicted token are real.
    """
    mask = attention_mask.astype(bool)
    return mask[:, :-1] & mask[:, 1:], input_ids[:, 1:]


def negative_log_likelihood(logits: np.ndarray, targets: np.ndarray,
                            mask: np.ndarray) -> tuple[float, int]:
    """Summed NLL (natural log, float64) of `targets` [B, S] under `logits` [B, S, V] over the
    positions where `mask` [B, S] is set, and how many positions that was. Sums pool batches.
    The sum is NaN when any of those positions holds NaN or Inf."""
    mask = mask.astype(bool)
    if not mask.any():
        return 0.0, 0
    if not np.isfinite(logits[mask]).all():
        return float("nan"), int(mask.sum())
    logp = log_softmax(logits[mask])
    picked = np.take_along_axis(logp, targets[mask].astype(np.int64)[:, None], axis=-1)
    return float(-picked.sum()), int(mask.sum())


def token_nll(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-token NLL (float64) of `targets` [B, S] under `logits` [B, S, V] at the positions
    where `mask` is set, in row-major order: [N]. NaN where the logits are not finite."""
    mask = mask.astype(bool)
    if not mask.any():
        return np.zeros(0)
    picked_logits = logits[mask]
    ok = finite_rows(picked_logits)
    logp = log_softmax(np.where(ok[:, None], picked_logits, 0.0))
    picked = np.take_along_axis(logp, targets[mask].astype(np.int64)[:, None], axis=-1)[:, 0]
    return np.where(ok, -picked, np.nan)


def perplexity(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    """exp(mean NLL) of `targets` under `logits` over the masked-in positions (padding masked
    out). A uniform distribution over V tokens has perplexity V. NaN when no position counts."""
    total, count = negative_log_likelihood(logits, targets, mask)
    return perplexity_from_nll(total, count)


def perplexity_from_nll(total: float, count: int) -> float:
    """exp(total / count), NaN for count 0: finishes a perplexity pooled over batches."""
    return float(np.exp(total / count)) if count else float("nan")


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval (95% for z = 1.96) of a rate measured as successes / trials.

    Agreement over N positions is a sampled rate: at N = 1024 and a rate near 0.97 the interval
    is about +-0.01 wide, so rates closer than that cannot be told apart. None when trials is 0."""
    if trials <= 0:
        return None
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * float(np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def clustered_mean_interval(values: np.ndarray, clusters: np.ndarray,
                            z: float = 1.96) -> tuple[float, float] | None:
    """A 95% (z = 1.96) interval of the mean of per-position `values` [N], whose positions come
    in correlated groups (`clusters` [N]: the sequence of each position).

    Positions of one sequence are not independent samples (one hard passage raises the KL of
    all its tokens), so the standard error is the cluster-robust one: the spread of the
    clusters' sums around their share of the mean, sqrt(G / (G - 1) * sum_g (S_g - n_g m)^2) / N
    over G clusters (with one cluster, the plain per-position standard error). NaN anywhere
    gives a NaN interval; None for no values."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return None
    if not np.isfinite(values).all():
        return float("nan"), float("nan")
    mean = float(values.mean())
    ids, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    groups = ids.size
    if groups >= 2:
        sums = np.bincount(inverse, weights=values, minlength=groups)
        counts = np.bincount(inverse, minlength=groups)
        se = float(np.sqrt(groups / (groups - 1) * ((sums - counts * mean) ** 2).sum())) / values.size
    else:
        se = float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0
    return mean - z * se, mean + z * se


def ppl_delta_interval(nll_diff: np.ndarray, clusters: np.ndarray,
                       z: float = 1.96) -> tuple[float, float] | None:
    """A 95% interval of the perplexity's relative change, from the per-token NLL differences
    (artifact minus reference, `nll_diff` [N]) of both models on the same tokens: the ratio of
    the perplexities is exp(mean difference), so the interval is exp(clustered interval of the
    mean difference) - 1. Pairing the two models token by token removes the text's own
    difficulty from the noise, which makes this interval far narrower than either
    perplexity's."""
    interval = clustered_mean_interval(nll_diff, clusters, z)
    if interval is None:
        return None
    return float(np.expm1(interval[0])), float(np.expm1(interval[1]))


def relative_delta(reference: float, artifact: float) -> float:
    """(artifact - reference) / reference: +0.01 means the artifact is 1% higher."""
    return (artifact - reference) / reference


# ----------------------------------------------------------------------------- greedy
@dataclass(frozen=True)
class Divergence:
    """The first greedy step where two generations disagree.

    sequence: the row of the compared arrays (the caller may offset it to a global sequence
    index); step: index of the generated token (0 = the token predicted by the prefill);
    margin: the reference's top-1 minus top-2 logit there (a small margin means a near tie that
    any rounding can flip)."""

    sequence: int
    step: int
    reference_token: int
    artifact_token: int
    margin: float


def logit_margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit along the last axis: [..., V] -> [...]; NaN where a logit is
    not finite."""
    if logits.shape[-1] < 2:
        return np.full(logits.shape[:-1], np.inf)
    top2 = np.sort(logits.astype(np.float64), axis=-1)[..., -2:]
    margin = top2[..., 1] - top2[..., 0]
    return np.where(np.isfinite(logits).all(axis=-1), margin, np.nan)


def matching_prefix(reference_tokens: np.ndarray, artifact_tokens: np.ndarray,
                    valid: np.ndarray | None = None) -> np.ndarray:
    """Per row of two [B, N] greedy token arrays, how many leading tokens agree: [B]. `valid`
    [B, N] (both sides' logits finite at that step) False makes a step disagree whatever
    tokens the two argmaxes returned."""
    same = reference_tokens == artifact_tokens
    if valid is not None:
        same = same & valid
    if same.shape[1] == 0:
        return np.zeros(same.shape[0], np.int64)
    first_diff = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return first_diff.astype(np.int64)


def greedy_divergence(reference_tokens: np.ndarray, artifact_tokens: np.ndarray,
                      reference_margins: np.ndarray,
                      valid: np.ndarray | None = None) -> Divergence | None:
    """The earliest step where any row's greedy tokens differ, or None when all agree.

    reference_tokens / artifact_tokens: [B, N]; reference_margins: [B, N] top-1 minus top-2
    logits of the reference at each step (see `logit_margin`); valid: as in
    `matching_prefix`. Ties pick the lowest row.
    """
    prefix = matching_prefix(reference_tokens, artifact_tokens, valid)
    steps = reference_tokens.shape[1]
    if (prefix >= steps).all():
        return None
    row = int(np.argmin(prefix))
    step = int(prefix[row])
    return Divergence(sequence=row, step=step, reference_token=int(reference_tokens[row, step]),
                      artifact_token=int(artifact_tokens[row, step]),
                      margin=float(reference_margins[row, step]))


# ----------------------------------------------------------------------------- router
def router_flips(reference_ids: np.ndarray, artifact_ids: np.ndarray) -> np.ndarray:
    """Per token, whether the chosen expert SET differs: [T, k] x [T, k] -> [T] bool.

    Order inside the top-k does not matter: (3, 5) and (5, 3) are the same choice."""
    return (np.sort(reference_ids, axis=-1) != np.sort(artifact_ids, axis=-1)).any(axis=-1)


def router_flip_rate(reference_ids: np.ndarray, artifact_ids: np.ndarray) -> float:
    """Fraction of tokens whose chosen expert set differs (0.0 for no tokens)."""
    flips = router_flips(reference_ids, artifact_ids)
    return float(flips.mean()) if flips.size else 0.0


def router_gap(router_logits: np.ndarray, k: int) -> np.ndarray:
    """Per token, the k-th minus the (k+1)-th largest router probability: [T, E] -> [T].

    A small gap means the k-th expert was nearly a tie with the first one left out, so a tiny
    numerical change may swap them. Infinite when k equals the number of experts."""
    if k >= router_logits.shape[-1]:
        return np.full(router_logits.shape[0], np.inf)
    probs = np.exp(log_softmax(router_logits))
    ranked = -np.sort(-probs, axis=-1)
    return ranked[:, k - 1] - ranked[:, k]


def near_tie_flips(flips: np.ndarray, reference_router_logits: np.ndarray, k: int,
                   threshold: float) -> int:
    """How many flipped tokens were near ties in the reference: router_gap < threshold.

    flips: [T] bool from `router_flips`; reference_router_logits: [T, E]. Flips that are not near
    ties are the alarming ones: the artifact changed a clear routing decision."""
    gaps = router_gap(reference_router_logits, k)
    return int((flips & (gaps < threshold)).sum())


def routing_from_logits(router_logits: np.ndarray, k: int) -> np.ndarray:
    """The top-k expert ids a router picks from its logits (softmax is monotonic): [T, E] -> [T, k]
    int32, ties to the lower expert id as in the MoEGate contract."""
    return topk_ids(router_logits, k).astype(np.int32)
