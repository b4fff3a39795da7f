"""Triton gating kernel vs gate_reference (interpreter): ids exactly, weights to f32 rounding."""

from __future__ import annotations

import pytest
import torch

from mixbuild.errors import UsageError
from mixbuild.model.ops import gate_reference
from tests.plugins.helpers import needs_triton

pytestmark = needs_triton


def run_gate(logits, k, normalize):
    from mixbuild.plugins.dispatch import moe_gate_triton

    return moe_gate_triton(logits, k, normalize)


def check_gate(logits, k, normalize):
    weights, ids = run_gate(logits, k, normalize)
    want_weights, want_ids = gate_reference(logits, k, normalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("E, k", [(8, 2), (7, 1), (5, 3), (3, 3)])
@pytest.mark.parametrize("normalize", [True, False])
def test_gate_random_logits(gen, E, k, normalize):
    check_gate(torch.randn(37, E, generator=gen) * 3, k, normalize)


def test_gate_ties_go_to_the_lower_expert_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0],      # three-way tie for first
                           [2.0, 2.0, 2.0, 2.0, 2.0],      # all equal
                           [0.0, 5.0, 1.0, 5.0, 1.0],      # ties for first and for third
                           [-1e30, 0.0, -1e30, 0.0, 0.0]])  # zero probabilities tie too
    for k in (1, 2, 3):
        check_gate(logits, k, True)
    _, ids = run_gate(logits, 3, True)
    assert ids.tolist() == [[1, 2, 3], [0, 1, 2], [1, 3, 2], [1, 3, 4]]


def test_gate_half_precision_logits_and_strided_input(gen):
    logits = torch.randn(9, 12, generator=gen).to(torch.bfloat16)
    check_gate(logits, 2, True)
    wide = torch.randn(6, 20, generator=gen)
    check_gate(wide[:, ::2], 2, True)                       # non-unit column stride


def test_gate_single_and_zero_tokens(gen):
    check_gate(torch.randn(1, 8, generator=gen), 2, True)
    weights, ids = run_gate(torch.empty(0, 8), 2, True)
    assert weights.shape == (0, 2) and ids.shape == (0, 2)


def test_gate_top_k_out_of_range():
    with pytest.raises(UsageError, match="top_k"):
        run_gate(torch.zeros(2, 3), 4, True)
