"""A compact, export-friendly PyTorch Mixtral whose MoE runs through mixbuild's custom ops.

One forward serves prefill and decode, in one of two KV-cache layouts (contract.Layout):

concat (the default)
    forward(input_ids [B, S], attention_mask [B, P+S], position_ids [B, S], *past)
        -> (logits [B, S, V], present.0.key, present.0.value, ..., [debug outputs])
    past is (key [B, Nkv, P, D], value [B, Nkv, P, D]) per layer, in layer order.
serving
    forward(input_ids [B, S], position_ids [B, S], cache_lengths [B], input_lengths [B], *cache)
        -> (logits [B, V] (or [B, S, V] with all_logits), updated cache ..., [debug outputs])
    cache is (key, value) [B, Nkv, C, D] per layer, of a fixed capacity C. Row b's new tokens are
    input_ids[b, :input_lengths[b]] (right-padded), written at cache positions
    cache_lengths[b] ..; each query attends the cache positions up to its own. The logits are
    those of each row's last valid token. GQA reads the Nkv heads directly (no repeated K/V).

With ``debug=True`` it also returns, per layer, the router logits [T, E], the chosen expert ids
[T, k] and the layer's output hidden state [B, S, H].
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from mixbuild.contract import Layout
from mixbuild.model import ops  # also registers torch.ops.mixbuild.*
from mixbuild.model.spec import MixtralSpec
from mixbuild.tensors import cast_finite


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


def serving_mask(cache_lengths: Tensor, seq: int, capacity: int, sliding_window: int | None) -> Tensor:
    """bool [B, 1, S, C]: query s of row b (at cache position cache_lengths[b] + s) may attend
    cache positions <= its own (and within the sliding window). Padded queries attend only
    positions that hold finite values, so nothing non-finite can reach a valid one."""
    k_pos = torch.arange(capacity, device=cache_lengths.device)
    q_pos = cache_lengths[:, None] + torch.arange(seq, device=cache_lengths.device)[None, :]
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        allowed = allowed & ((q_pos[:, :, None] - k_pos[None, None, :]) < sliding_window)
    return allowed[:, None]


class Attention(nn.Module):
    def __init__(self, spec: MixtralSpec) -> None:
        super().__init__()
        h, self.nq, self.nkv, self.d = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(h, spec.q_size, bias=False)
        self.k_proj = nn.Linear(h, spec.kv_size, bias=False)
        self.v_proj = nn.Linear(h, spec.kv_size, bias=False)
        self.o_proj = nn.Linear(spec.q_size, h, bias=False)
        self.inplace = False        # serving layout: write the caller's cache in place (eager)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.nq, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.nkv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.nkv, self.d).transpose(1, 2)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def forward_serving(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache_k: Tensor,
                        cache_v: Tensor, cache_lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The custom ops (what the exporter translates) or, with `inplace`, the eager runtime's
        in-place cache write and fused attention: the same numbers."""
        b, s, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        if self.inplace:
            cache_k = ops.kv_write_(cache_k, k, cache_lengths)
            cache_v = ops.kv_write_(cache_v, v, cache_lengths)
            out = ops.attention_sdpa(q, cache_k, cache_v, mask)
        else:
            cache_k = torch.ops.mixbuild.kv_write(cache_k, k, cache_lengths)
            cache_v = torch.ops.mixbuild.kv_write(cache_v, v, cache_lengths)
            out = torch.ops.mixbuild.gqa_attention(q, cache_k, cache_v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.nq * self.d)), cache_k, cache_v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, past_k: Tensor,
                past_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, s, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
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

    def forward(self, x, cos, sin, mask, k, v, cache_lengths: Tensor | None = None):
        """Concat layout (cache_lengths None): mask is the additive bias and k, v are the past.
        Serving layout: mask is the boolean serving mask, k, v the fixed-capacity cache and
        cache_lengths each row's valid length before this step."""
        normed = self.input_norm(x)
        if cache_lengths is None:
            attn, k, v = self.attn(normed, cos, sin, mask, k, v)
        else:
            attn, k, v = self.attn.forward_serving(normed, cos, sin, mask, k, v, cache_lengths)
        x = x + attn
        moe, router_logits, ids = self.moe(self.post_norm(x))
        return x + moe, k, v, router_logits, ids


class MixtralModel(nn.Module):
    """The concat layout (see the module docstring); ServingMixtralModel is the serving one."""

    layout = Layout.CONCAT

    def __init__(self, spec: MixtralSpec, debug: bool = False, all_logits: bool = False) -> None:
        super().__init__()
        self.spec, self.debug, self.all_logits = spec, debug, all_logits
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                *past: Tensor) -> tuple[Tensor, ...]:
        bias = attention_bias(attention_mask, input_ids.shape[1], self.spec.sliding_window)
        x, presents, debug = self._layers(input_ids, position_ids, bias, past)
        logits = self.lm_head(self.norm(x)).float()
        return (logits, *presents, *(debug if self.debug else []))

    def _layers(self, input_ids, position_ids, mask, kv, cache_lengths: Tensor | None = None):
        x = self.embed(input_ids)
        cos, sin = rope_tables(position_ids, self.spec.rope_theta, self.spec.head_dim, x.dtype)
        out_kv, debug = [], []
        for i, layer in enumerate(self.layers):
            x, k, v, router_logits, ids = layer(x, cos, sin, mask, kv[2 * i], kv[2 * i + 1],
                                                cache_lengths)
            out_kv += [k, v]
            debug += [router_logits, ids, x]
        return x, out_kv, debug

    def empty_past(self, batch: int) -> list[Tensor]:
        s = self.spec
        shape = (batch, s.num_kv_heads, 0, s.head_dim)
        p = self.lm_head.weight
        return [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(2 * s.num_layers)]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, path_or_ckpt, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        debug: bool = False, all_logits: bool = False) -> MixtralModel:
        """Build the model and fill it from a checkpoint, one tensor at a time."""
        from mixbuild.model.checkpoint import Checkpoint

        ckpt = path_or_ckpt if isinstance(path_or_ckpt, Checkpoint) else Checkpoint(Path(path_or_ckpt))
        ckpt.verify()
        with torch.device("meta"):
            model = cls(ckpt.spec, debug=debug, all_logits=all_logits)
        model.to_empty(device=device)
        model.to(dtype)
        with torch.no_grad():
            for param_name, loader in weight_sources(ckpt):  # reads are checked finite
                model.get_parameter(param_name).copy_(cast_finite(
                    loader(), dtype, param_name, overflow_hint="load it as float32 or bfloat16"))
        return model.eval()


class ServingMixtralModel(MixtralModel):
    """The serving layout (see the module docstring); the same parameters as MixtralModel."""

    layout = Layout.SERVING

    def write_in_place(self, enabled: bool = True) -> ServingMixtralModel:
        """Update the cache tensors the caller passes in place (the torch runtime); the default,
        functional form is what the exporter traces."""
        for layer in self.layers:
            layer.attn.inplace = enabled
        return self

    def forward(self, input_ids: Tensor, position_ids: Tensor, cache_lengths: Tensor,
                input_lengths: Tensor, *cache: Tensor) -> tuple[Tensor, ...]:
        mask = serving_mask(cache_lengths, input_ids.shape[1], cache[0].shape[2],
                            self.spec.sliding_window)
        x, updated, debug = self._layers(input_ids, position_ids, mask, cache, cache_lengths)
        if not self.all_logits:   # only each row's last valid token reaches the lm_head
            last = (input_lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, x.shape[-1])
            x = x.gather(1, last).squeeze(1)
        logits = self.lm_head(self.norm(x)).float()
        return (logits, *updated, *(debug if self.debug else []))


def model_class(layout: Layout) -> type[MixtralModel]:
    return ServingMixtralModel if layout is Layout.SERVING else MixtralModel


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
