"""A compact, export-friendly PyTorch Mixtral whose MoE runs through mixbuild's custom ops.

One forward serves prefill and decode:
    forward(input_ids [B, S], attention_mask [B, P+S], position_ids [B, S], *past)
        -> (logits [B, S, V], present.0.key, present.0.value, ..., [debug outputs])
where past is (key [B, Nkv, P, D], value [B, Nkv, P, D]) per layer, in layer order. With
``debug=True`` it also returns, per layer, the router logits [T, E], the chosen expert ids
[T, k] and the layer's output hidden state [B, S, H].
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from mixbuild.model import ops  # noqa: F401  (registers torch.ops.mixbuild.*)
from mixbuild.model.spec import MixtralSpec


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(position_ids: Tensor, theta: float, head_dim: int,
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [B, 1, S, D]. The frequencies are computed in float32 from constants (not a
    buffer), so casting the model to fp16/bf16 never rounds them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device)
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def attention_bias(attention_mask: Tensor, seq: int, sliding_window: int | None) -> Tensor:
    """Additive float32 bias [B, 1, S, P+S]: causal over cache positions, padding masked out."""
    total = attention_mask.shape[1]
    k_pos = torch.arange(total, device=attention_mask.device)
    q_pos = k_pos[total - seq:]
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        allowed = allowed & ((q_pos[:, None] - k_pos[None, :]) < sliding_window)
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


class Attention(nn.Module):
    def __init__(self, spec: MixtralSpec) -> None:
        super().__init__()
        h, self.nq, self.nkv, self.d = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(h, spec.q_size, bias=False)
        self.k_proj = nn.Linear(h, spec.kv_size, bias=False)
        self.v_proj = nn.Linear(h, spec.kv_size, bias=False)
        self.o_proj = nn.Linear(spec.q_size, h, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, past_k: Tensor,
                past_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.nq, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.nkv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.nkv, self.d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_all, v_all = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        rep = self.nq // self.nkv
        k_rep = k_all[:, :, None].expand(-1, -1, rep, -1, -1).reshape(b, self.nq, -1, self.d)
        v_rep = v_all[:, :, None].expand(-1, -1, rep, -1, -1).reshape(b, self.nq, -1, self.d)
        scores = (q @ k_rep.transpose(2, 3)).float() * (self.d ** -0.5) + bias
        probs = torch.softmax(scores, dim=-1).to(x.dtype)
        out = (probs @ v_rep).transpose(1, 2).reshape(b, s, self.nq * self.d)
        return self.o_proj(out), k_all, v_all


class SparseMoE(nn.Module):
    def __init__(self, spec: MixtralSpec) -> None:
        super().__init__()
        e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
        self.top_k = spec.top_k
        self.gate = nn.Linear(h, e, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(e, 2 * i, h))
        self.w_down = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        flat = x.reshape(-1, x.shape[-1])
        router_logits = self.gate(flat)
        weights, ids = torch.ops.mixbuild.moe_gate(router_logits, self.top_k, True)
        out = torch.ops.mixbuild.moe_experts(flat, weights, ids, self.w_gate_up, self.w_down)
        return out.view_as(x), router_logits, ids


class DecoderLayer(nn.Module):
    def __init__(self, spec: MixtralSpec) -> None:
        super().__init__()
        self.input_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.attn = Attention(spec)
        self.post_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.moe = SparseMoE(spec)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        attn, k, v = self.attn(self.input_norm(x), cos, sin, bias, past_k, past_v)
        x = x + attn
        moe, router_logits, ids = self.moe(self.post_norm(x))
        return x + moe, k, v, router_logits, ids


class MixtralModel(nn.Module):
    def __init__(self, spec: MixtralSpec, debug: bool = False) -> None:
        super().__init__()
        self.spec, self.debug = spec, debug
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                *past: Tensor) -> tuple[Tensor, ...]:
        x = self.embed(input_ids)
        cos, sin = rope_tables(position_ids, self.spec.rope_theta, self.spec.head_dim, x.dtype)
        bias = attention_bias(attention_mask, input_ids.shape[1], self.spec.sliding_window)
        presents, debug = [], []
        for i, layer in enumerate(self.layers):
            x, k, v, router_logits, ids = layer(x, cos, sin, bias, past[2 * i], past[2 * i + 1])
            presents += [k, v]
            debug += [router_logits, ids, x]
        logits = self.lm_head(self.norm(x)).float()
        return (logits, *presents, *(debug if self.debug else []))

    def empty_past(self, batch: int) -> list[Tensor]:
        s = self.spec
        shape = (batch, s.num_kv_heads, 0, s.head_dim)
        p = self.lm_head.weight
        return [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(2 * s.num_layers)]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, path_or_ckpt, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        debug: bool = False) -> MixtralModel:
        """Build the model and fill it from a checkpoint, one tensor at a time."""
        from mixbuild.model.checkpoint import Checkpoint

        ckpt = path_or_ckpt if isinstance(path_or_ckpt, Checkpoint) else Checkpoint(Path(path_or_ckpt))
        ckpt.verify()
        with torch.device("meta"):
            model = cls(ckpt.spec, debug=debug)
        model.to_empty(device=device)
        model.to(dtype)
        with torch.no_grad():
            for param_name, loader in weight_sources(ckpt):
                model.get_parameter(param_name).copy_(loader())
        return model.eval()


def weight_sources(ckpt):
    """(parameter name, zero-argument loader) for every parameter of MixtralModel."""
    yield "embed.weight", lambda: ckpt.weight("embed")
    yield "norm.weight", lambda: ckpt.weight("final_norm")
    yield "lm_head.weight", lambda: ckpt.weight("lm_head")
    for i in range(ckpt.spec.num_layers):
        p = f"layers.{i}."
        for name, role in (("input_norm.weight", "input_norm"), ("post_norm.weight", "post_norm"),
                           ("attn.q_proj.weight", "q_proj"), ("attn.k_proj.weight", "k_proj"),
                           ("attn.v_proj.weight", "v_proj"), ("attn.o_proj.weight", "o_proj"),
                           ("moe.gate.weight", "router")):
            yield p + name, (lambda role=role, i=i: ckpt.weight(role, i))
        yield p + "moe.w_gate_up", (lambda i=i: ckpt.expert_gate_up(i))
        yield p + "moe.w_down", (lambda i=i: ckpt.expert_down(i))
