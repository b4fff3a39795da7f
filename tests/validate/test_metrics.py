"""Every metric on hand-made inputs with known answers."""

import math

import numpy as np
import pytest
import torch

from mixbuild.model.ops import experts_reference
from mixbuild.validate import metrics as M
from mixbuild.validate.experts import expert_errors, expert_output


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(size=(6, 11)).astype(np.float32)


def test_identical_logits_have_no_error(logits):
    assert M.max_abs_error(logits, logits) == 0.0
    assert M.mean_abs_error(logits, logits) == 0.0
    assert M.cosine_min(logits, logits) == pytest.approx(1.0)
    np.testing.assert_allclose(M.kl_divergence(logits, logits), 0.0, atol=1e-12)
    assert M.topk_agreement(logits, logits, 1).mean() == 1.0
    assert M.topk_agreement(logits, logits, 5).mean() == 1.0


def test_abs_errors_known_values():
    a = np.array([[0.0, 1.0], [2.0, 3.0]])
    b = np.array([[0.5, 1.0], [2.0, 1.0]])
    assert M.max_abs_error(a, b) == 2.0
    assert M.mean_abs_error(a, b) == pytest.approx(2.5 / 4)
    assert M.max_abs_error(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0


def test_cosine_known_values():
    ref = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 4.0]])
    art = np.array([[1.0, 1.0], [0.0, 5.0], [-1.0, -2.0], [0.0, 0.0], [6.0, 8.0]])
    np.testing.assert_allclose(M.cosine_similarity(ref, art), [1 / math.sqrt(2), 0.0, -1.0, 1.0, 1.0])
    assert M.cosine_min(ref, art) == pytest.approx(-1.0)


def test_kl_known_value_and_shift_invariance():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    got = M.kl_divergence(np.log(p)[None] + 7.0, np.log(q)[None] - 3.0)
    assert got[0] == pytest.approx(expected, rel=1e-12)
    # direction matters: KL(ref || art), not the reverse
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert got[0] != pytest.approx(reverse)


def test_kl_is_float64_and_stable_for_huge_logits():
    ref = np.array([[1000.0, 0.0, -1000.0]], np.float32)
    art = np.array([[1000.0, 0.0, -1000.0]], np.float32)
    assert np.isfinite(M.kl_divergence(ref, art)).all()
    assert M.log_softmax(ref).dtype == np.float64


def test_topk_agreement_crafted():
    ref = np.array([[6.0, 5, 4, 3, 2, 1, 0]])
    art = np.array([[5.0, 6, 4, 3, 2, 1, 0]])       # top-1 swapped, same top-5 set
    assert M.topk_agreement(ref, art, 1)[0] == 0.0
    assert M.topk_agreement(ref, art, 5)[0] == 1.0
    art2 = np.array([[6.0, 5, 4, 3, 0, 1, 2]])      # one of the top-5 replaced
    assert M.topk_agreement(ref, art2, 1)[0] == 1.0
    assert M.topk_agreement(ref, art2, 5)[0] == pytest.approx(4 / 5)


def test_topk_ties_go_to_lower_id():
    assert M.topk_ids(np.array([[1.0, 3.0, 3.0, 0.0]]), 2).tolist() == [[1, 2]]
    assert M.routing_from_logits(np.array([[2.0, 2.0, 2.0]]), 2).tolist() == [[0, 1]]


def test_perplexity_of_uniform_distribution_is_vocab_size():
    vocab = 37
    logits = np.zeros((2, 5, vocab), np.float32)
    targets = np.random.default_rng(1).integers(0, vocab, (2, 5))
    mask = np.ones((2, 5), bool)
    assert M.perplexity(logits, targets, mask) == pytest.approx(vocab)


def test_perplexity_masks_padding():
    vocab = 4
    logits = np.zeros((1, 3, vocab))
    logits[0, 0] = [100.0, -100, -100, -100]  # a padded position, confidently wrong
    targets = np.array([[3, 1, 2]])
    mask = np.array([[False, True, True]])
    assert M.perplexity(logits, targets, mask) == pytest.approx(vocab)
    assert math.isnan(M.perplexity(logits, targets, np.zeros_like(mask)))


def test_perplexity_of_a_certain_model_is_one():
    targets = np.array([[2, 0, 1]])
    logits = np.full((1, 3, 3), -50.0)
    logits[0, np.arange(3), targets[0]] = 50.0
    assert M.perplexity(logits, targets, np.ones((1, 3))) == pytest.approx(1.0)


def test_next_token_targets_alignment_with_left_padding():
    ids = np.array([[0, 0, 5, 6, 7]])
    mask = np.array([[0, 0, 1, 1, 1]])
    positions, targets = M.next_token_targets(ids, mask)
    assert targets.tolist() == [[0, 5, 6, 7]]
    assert positions.tolist() == [[False, False, True, True]]  # 5 -> 6, 6 -> 7


def test_pooled_nll_equals_joint_perplexity():
    rng = np.random.default_rng(2)
    logits, targets = rng.normal(size=(2, 4, 9)), rng.integers(0, 9, (2, 4))
    mask = np.ones((2, 4), bool)
    a = M.negative_log_likelihood(logits[:1], targets[:1], mask[:1])
    b = M.negative_log_likelihood(logits[1:], targets[1:], mask[1:])
    pooled = M.perplexity_from_nll(a[0] + b[0], a[1] + b[1])
    assert pooled == pytest.approx(M.perplexity(logits, targets, mask))


def test_wilson_interval_textbook_values_and_shape():
    # Wilson 95% intervals as tabulated (Newcombe 1998): 0/10 and 5/10
    low, high = M.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = M.wilson_interval(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    # the interval holds the rate and narrows as the same rate is measured over more positions
    narrow, wide = M.wilson_interval(9700, 10000), M.wilson_interval(97, 100)
    assert wide[0] < narrow[0] < 0.97 < narrow[1] < wide[1]
    assert M.wilson_interval(0, 0) is None


def test_relative_delta():
    assert M.relative_delta(100.0, 101.0) == pytest.approx(0.01)
    assert M.relative_delta(100.0, 95.0) == pytest.approx(-0.05)


def test_greedy_divergence_finds_first_step_and_margin():
    ref = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    art = np.array([[1, 2, 3, 9], [5, 0, 7, 8]])
    margins = np.arange(8, dtype=float).reshape(2, 4) / 10
    assert M.matching_prefix(ref, art).tolist() == [3, 1]
    d = M.greedy_divergence(ref, art, margins)
    assert (d.sequence, d.step, d.reference_token, d.artifact_token) == (1, 1, 6, 0)
    assert d.margin == pytest.approx(0.5)
    assert M.greedy_divergence(ref, ref, margins) is None
    assert M.matching_prefix(ref[:, :0], art[:, :0]).tolist() == [0, 0]


def test_logit_margin():
    assert M.logit_margin(np.array([[1.0, 4.0, 3.5]]))[0] == pytest.approx(0.5)
    assert M.logit_margin(np.array([[2.0, 2.0]]))[0] == 0.0


def test_router_flips_ignore_order_within_top_k():
    ref = np.array([[0, 1], [2, 3], [4, 5], [6, 7]], np.int32)
    art = np.array([[1, 0], [2, 3], [4, 6], [7, 6]], np.int32)
    assert M.router_flips(ref, art).tolist() == [False, False, True, False]
    assert M.router_flip_rate(ref, art) == 0.25
    assert M.router_flip_rate(ref[:0], art[:0]) == 0.0


def test_near_tie_flips():
    # token 0: experts 0/1 chosen, expert 2 nearly tied with expert 1; token 1: a clear choice
    logits = np.log(np.array([[0.4, 0.301, 0.299, 0.0001], [0.6, 0.35, 0.04, 0.01]]))
    gaps = M.router_gap(logits, 2)
    assert gaps[0] == pytest.approx(0.002, rel=1e-2)
    assert gaps[1] == pytest.approx(0.31, rel=1e-2)
    flips = np.array([True, True])
    assert M.near_tie_flips(flips, logits, 2, threshold=0.01) == 1
    assert M.near_tie_flips(flips, logits, 2, threshold=0.5) == 2
    assert M.near_tie_flips(np.array([False, False]), logits, 2, threshold=0.5) == 0
    assert np.isinf(M.router_gap(logits, 4)).all()


def test_router_logit_and_hidden_errors_use_max_abs():
    ref = np.zeros((3, 4))
    art = ref.copy()
    art[1, 2] = -0.25
    assert M.max_abs_error(ref, art) == 0.25


def test_real_positions():
    values = np.arange(6).reshape(2, 3)[..., None]
    mask = np.array([[0, 1, 1], [1, 1, 1]])
    assert M.real_positions(values, mask)[:, 0].tolist() == [1, 2, 3, 4, 5]


def test_expert_output_matches_reference_op():
    rng = np.random.default_rng(3)
    e, h, i, t = 4, 8, 6, 5
    w_gate_up = rng.normal(size=(e, 2 * i, h)).astype(np.float32)
    w_down = rng.normal(size=(e, h, i)).astype(np.float32)
    x = rng.normal(size=(t, h)).astype(np.float32)
    ids = torch.full((t, 1), 2, dtype=torch.int32)
    want = experts_reference(torch.from_numpy(x), torch.ones(t, 1), ids, torch.from_numpy(w_gate_up),
                             torch.from_numpy(w_down)).numpy()
    np.testing.assert_allclose(expert_output(x, w_gate_up[2], w_down[2]), want, rtol=1e-5, atol=1e-5)


def test_expert_errors_point_at_the_changed_expert():
    rng = np.random.default_rng(4)
    e, h, i = 4, 8, 6
    ref = (rng.normal(size=(e, 2 * i, h)).astype(np.float32), rng.normal(size=(e, h, i)).astype(np.float32))
    art = (ref[0].copy(), ref[1].copy())
    art[1][1] *= 2.0
    x = rng.normal(size=(6, h)).astype(np.float32)
    ids = np.array([[0, 1], [1, 2], [0, 2], [0, 1], [2, 0], [1, 0]])  # expert 3 unused
    errors, counts = expert_errors(x, ids, ref, art)
    assert counts.tolist() == [5, 4, 3, 0]
    assert errors[0] == 0.0 and errors[2] == 0.0 and errors[1] > 0.1
    assert np.isnan(errors[3])
