import torch

from mixbuild.model.ops import experts_reference, gate_reference


def test_gate_ties_go_to_lower_expert_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    weights, ids = torch.ops.mixbuild.moe_gate(logits, 2, True)
    assert ids.tolist() == [[1, 2]]
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.allclose(weights, torch.tensor([[0.5, 0.5]]))


def test_gate_normalisation_and_softmax():
    logits = torch.randn(17, 8)
    w, ids = gate_reference(logits, 3, normalize=False)
    probs = torch.softmax(logits, -1)
    assert torch.allclose(w, probs.gather(1, ids.long()))
    wn, _ = gate_reference(logits, 3, normalize=True)
    assert torch.allclose(wn.sum(-1), torch.ones(17))


def _dense_moe(x, weights, ids, w_gate_up, w_down):
    """Every expert on every token, masked: an independent formulation of the same thing."""
    out = torch.zeros_like(x)
    for e in range(w_gate_up.shape[0]):
        gate, up = (x @ w_gate_up[e].T).chunk(2, -1)
        y = (torch.nn.functional.silu(gate) * up) @ w_down[e].T
        coef = (weights * (ids == e)).sum(-1, keepdim=True)
        out += coef * y
    return out


def test_experts_match_dense_formulation_with_empty_experts():
    torch.manual_seed(0)
    t, h, i, e, k = 11, 16, 24, 6, 2
    x = torch.randn(t, h)
    w_gate_up, w_down = torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    ids = torch.randint(0, 3, (t, k), dtype=torch.int32)  # experts 3..5 receive nothing
    weights = torch.rand(t, k)
    got = torch.ops.mixbuild.moe_experts(x, weights, ids, w_gate_up, w_down)
    assert torch.allclose(got, _dense_moe(x, weights, ids, w_gate_up, w_down), atol=1e-4)
    assert torch.allclose(experts_reference(x[:1], weights[:1], ids[:1], w_gate_up, w_down),
                          _dense_moe(x[:1], weights[:1], ids[:1], w_gate_up, w_down), atol=1e-4)
