"""The two MoE ops every mixbuild stage shares, as torch custom ops.

    mixbuild::moe_gate(router_logits [T, E], top_k, normalize) -> (weights [T, k] f32, ids [T, k] i32)
    mixbuild::moe_experts(hidden [T, H], weights [T, k], ids [T, k],
                          w_gate_up [E, 2I, H], w_down [E, H, I]) -> out [T, H]

These plain-torch implementations are the semantic definition: the exporter turns each call
into one ONNX custom node (with a standard-ONNX body), and GPU kernels must match them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gate_reference(router_logits: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """Softmax in float32, top-k with ties to the lower expert id, optional renormalisation."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    values, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, ids = values[:, :top_k], ids[:, :top_k].to(torch.int32)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def experts_reference(hidden: Tensor, weights: Tensor, expert_ids: Tensor, w_gate_up: Tensor,
                      w_down: Tensor) -> Tensor:
    """Sparse SwiGLU experts: each token runs only its k chosen experts, weighted and summed.

    Tokens are grouped by expert (a stable sort of the flattened ids), so each expert does one
    GEMM over its tokens, the same schedule the GPU kernels use.
    """
    num_tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1).long()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w_gate_up.shape[0]).tolist()
    flat_weights = weights.reshape(-1).float()
    out = torch.zeros(num_tokens, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        slots = order[start:start + count]
        start += count
        tokens = slots // top_k
        gate, up = (hidden[tokens] @ w_gate_up[expert].T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w_down[expert].T
        out.index_add_(0, tokens, y.float() * flat_weights[slots, None])
    return out.to(hidden.dtype)


@torch.library.custom_op("mixbuild::moe_gate", mutates_args=())
def moe_gate(router_logits: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    return gate_reference(router_logits, top_k, normalize)


@moe_gate.register_fake
def _moe_gate_fake(router_logits: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    shape = (router_logits.shape[0], top_k)
    return (router_logits.new_empty(shape, dtype=torch.float32),
            router_logits.new_empty(shape, dtype=torch.int32))


@torch.library.custom_op("mixbuild::moe_experts", mutates_args=())
def moe_experts(hidden: Tensor, weights: Tensor, expert_ids: Tensor, w_gate_up: Tensor,
                w_down: Tensor) -> Tensor:
    return experts_reference(hidden, weights, expert_ids, w_gate_up, w_down)


@moe_experts.register_fake
def _moe_experts_fake(hidden: Tensor, weights: Tensor, expert_ids: Tensor, w_gate_up: Tensor,
                      w_down: Tensor) -> Tensor:
    return torch.empty_like(hidden)
