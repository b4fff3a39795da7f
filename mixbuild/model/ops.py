"""The torch custom ops every mixbuild stage shares: the two MoE ops, and the serving layout's
cache write and grouped-query attention.

    mixbuild::moe_gate(router_logits [T, E], top_k, normalize) -> (weights [T, k] f32, ids [T, k] i32)
    mixbuild::moe_experts(hidden [T, H], weights [T, k], ids [T, k],
                          w_gate_up [E, 2I, H], w_down [E, H, I]) -> out [T, H]
    mixbuild::kv_write(cache [B, Nkv, C, D], update [B, Nkv, S, D], write_index [B]) -> cache
    mixbuild::gqa_attention(q [B, Nq, S, D], k [B, Nkv, C, D], v, mask [B, 1, S, C]) -> [B, Nq, S, D]

These plain-torch implementations are the semantic definition: the exporter turns each MoE call
into one ONNX custom node (with a standard-ONNX body), and GPU kernels must match them; the two
serving-layout ops become the standard ONNX TensorScatter and Attention (opset 24).
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


# ------------------------------------------------------------------ the serving layout's cache

def kv_write_reference(cache: Tensor, update: Tensor, write_index: Tensor) -> Tensor:
    """cache [B, Nkv, C, D] with update [B, Nkv, S, D] written at positions
    write_index[b] .. write_index[b] + S - 1 of row b (ONNX TensorScatter, axis 2, linear).
    The caller guarantees write_index[b] + S <= C."""
    out = cache.clone()
    seq = update.shape[2]
    for b in range(cache.shape[0]):
        start = int(write_index[b])
        out[b, :, start:start + seq] = update[b]
    return out


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Grouped-query attention (ONNX Attention, 4-D inputs): q [B, Nq, S, D] over k, v
    [B, Nkv, C, D] (Nq a multiple of Nkv; query head h reads kv head h // (Nq / Nkv)), mask bool
    [B, 1, S, C] (True: may attend), scale 1/sqrt(D), softmax in float32."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(2, 3)).float() * (q.shape[-1] ** -0.5)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1).to(q.dtype) @ v)


def kv_write_(cache: Tensor, update: Tensor, write_index: Tensor) -> Tensor:
    """kv_write in place, for the eager runtime (no host sync, so it can be graph-captured):
    returns `cache` itself, changed."""
    seq = update.shape[2]
    index = write_index[:, None] + torch.arange(seq, device=update.device)[None, :]     # [B, S]
    return cache.scatter_(2, index[:, None, :, None].expand_as(update), update)


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """gqa_attention through torch's fused attention (no repeated K/V), for the eager runtime."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@torch.library.custom_op("mixbuild::kv_write", mutates_args=())
def kv_write(cache: Tensor, update: Tensor, write_index: Tensor) -> Tensor:
    return kv_write_reference(cache, update, write_index)


@kv_write.register_fake
def _kv_write_fake(cache: Tensor, update: Tensor, write_index: Tensor) -> Tensor:
    return torch.empty_like(cache)


@torch.library.custom_op("mixbuild::gqa_attention", mutates_args=())
def gqa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    return attention_reference(q, k, v, mask)


@gqa_attention.register_fake
def _gqa_attention_fake(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    return torch.empty_like(q)
