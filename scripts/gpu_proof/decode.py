"""Stage 5: one decode step of a Mixtral-8x7B-shaped model with random weights built on the GPU,
FP8 (W8A8) and INT4 (W4A16), at several batch sizes, against its memory floor and a naive torch
baseline. No benchmark in benchmarks/ decodes at these shapes on a GPU, so the step is built here.

The step (one new token per row, context `context` in a static KV cache, captured in a CUDA
graph): embed, then per layer RMSNorm, QKV projection, RoPE, cache write, GQA attention over the
cache, O projection, RMSNorm, router (bf16), Triton gate and experts, then the final norm and
the bf16 lm_head. Dense projections are quantized like the experts: FP8 through torch._scaled_mm
with static per-tensor scales; INT4 through mixbuild's down-projection kernel run as a dense
W4A16 GEMM (one expert, one slot per token), since nothing else at hand runs 4-bit weights.

floor = bytes the step must read / measured copy bandwidth: every dense weight (and its
scales), the router and lm_head in bf16, the weights of the experts the step's tokens really
chose (counted from its routing), and the valid KV cache. About 12.9 GB (FP8) and 6.8 GB (INT4)
at batch 1. The baseline runs the same step eagerly with every quantized weight dequantized to
bf16 when used and the MoE as ops.experts_reference (a per-expert loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_proof.core import SKIPPED_BUDGET, Context, goal, median_seconds

BATCH1_GOAL, ALL_BATCHES_GOAL = 1.3, 1.6


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    group_size: int


MIXTRAL_8X7B = Shape(32, 4096, 14336, 8, 2, 32, 8, 128, 32000, 512, 128)
TINY = Shape(2, 64, 96, 4, 2, 4, 2, 16, 128, 8, 32)


def decode_stage(ctx: Context) -> dict:
    p = ctx.profile
    shape = TINY if p.dry_run else MIXTRAL_8X7B
    copy_bw = ctx.ceilings.get("copy_bytes_per_s")
    rows, skipped = [], []
    for scheme in ("fp8", "int4"):
        if ctx.clock.expired():
            skipped.append({"scheme": scheme, "skipped": SKIPPED_BUDGET})
            continue
        model = DecodeModel(shape, scheme, p.device)
        for batch in p.decode_batches:
            if ctx.clock.expired():
                skipped.append({"scheme": scheme, "batch": batch, "skipped": SKIPPED_BUDGET})
                continue
            rows.append(measure(model, batch, p, copy_bw))
        del model
    return {"passed": bool(rows) and all(r.get("finite", False) for r in rows),
            "shape": shape.__dict__, "rows": rows, "skipped_items": skipped,
            "goals": decode_goals(rows, skipped)}


def measure(model: DecodeModel, batch: int, profile, copy_bw: float | None) -> dict:
    state = model.state(batch)
    step = lambda: model.step(state)  # noqa: E731
    seconds = median_seconds(step, profile, graph=profile.device == "cuda")
    logits = model.step(state)
    floor_bytes = model.bytes_read(state)
    row = {"scheme": model.scheme, "batch": batch, "step_ms": seconds * 1e3,
           "tokens_per_s": batch / seconds, "floor_bytes": floor_bytes,
           "finite": bool(torch.isfinite(logits.float()).all())}
    if copy_bw:
        row["floor_ms"] = floor_bytes / copy_bw * 1e3
        row["vs_floor"] = row["step_ms"] / row["floor_ms"]
    try:
        naive = median_seconds(lambda: model.step(state, naive=True), profile, graph=False,
                               reps=2, inner=1)
        row["naive_ms"] = naive * 1e3
        row["speedup_vs_naive"] = naive / seconds
    except Exception as exc:     # the baseline's failure is recorded, not the stage's
        row["naive_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return row


def decode_goals(rows: list[dict], skipped: list[dict]) -> list[dict]:
    out = []
    for scheme in ("fp8", "int4"):
        mine = [r for r in rows if r["scheme"] == scheme]
        first = [r for r in mine if r["batch"] == 1]
        out.append(goal(f"{scheme}: batch 1 within {BATCH1_GOAL}x of the floor",
                        _all(first, BATCH1_GOAL)))
        out.append(goal(f"{scheme}: every batch within {ALL_BATCHES_GOAL}x of the floor",
                        _all(mine, ALL_BATCHES_GOAL, complete=not any(
                            s.get("scheme") == scheme for s in skipped))))
    return out


def _all(rows: list[dict], limit: float, complete: bool = True) -> bool | None:
    """True when every row is within `limit` of its floor; None when nothing (or not everything
    that should have been) was measured and nothing failed."""
    ratios = [r.get("vs_floor") for r in rows]
    if any(v is not None and v > limit for v in ratios):
        return False
    if not ratios or any(v is None for v in ratios) or not complete:
        return None
    return True


# ------------------------------------------------------------------------------------ model

class DenseLinear:
    """y = x W^T with W stored in the decode's scheme, and its naive (dequantize-per-call) twin."""

    def __init__(self, N: int, K: int, scheme: str, group_size: int, device: str) -> None:
        self.scheme, self.N, self.K, self.group_size = scheme, N, K, group_size
        if scheme == "fp8":
            self.w = (torch.randn(N, K, device=device, dtype=torch.bfloat16)).to(torch.float8_e4m3fn)
            self.w_scale = torch.full((), K ** -0.5, device=device)
            self.act_scale = torch.full((), 8.0 / 448, device=device)
        else:
            self.w = torch.randint(0, 256, (1, N, K // 2), dtype=torch.uint8, device=device)
            self.w_scale = torch.full((1, N, -(-K // group_size)), 1 / (4.6 * K ** 0.5),
                                      dtype=torch.float16, device=device)

    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size() + self.w_scale.numel() * self.w_scale.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme == "fp8":
            xq = (x.float() / self.act_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            return torch._scaled_mm(xq, self.w.T, self.act_scale, self.w_scale,
                                    out_dtype=torch.bfloat16)
        return int4_linear(x, self.w, self.w_scale, self.group_size)

    def naive(self, x: torch.Tensor) -> torch.Tensor:
        from mixbuild.plugins import formats as F

        if self.scheme == "fp8":
            w = (self.w.to(torch.bfloat16) * self.w_scale).to(torch.bfloat16)
        else:
            w = F.dequantize_int4(self.w, self.w_scale, self.group_size)[0].to(torch.bfloat16)
        return x @ w.T


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [T, K] bf16 @ dequantized(packed [1, N, K/2], scale [1, N, G])^T through mixbuild's
    down-projection kernel: one expert, one slot per token, routing weight 1."""
    from mixbuild.contract import QuantScheme
    from mixbuild.plugins import dispatch as D
    from mixbuild.plugins.align import moe_align
    from mixbuild.plugins.problem import ExpertsProblem

    T, K = x.shape
    N = packed.shape[1]
    p = ExpertsProblem(T=T, H=N, I=K, E=1, k=1, scheme=QuantScheme.INT4, dtype=x.dtype,
                       group_size=group_size)
    cfg = D.kernel_config(p, x.device)
    ids = torch.zeros(T, 1, dtype=torch.int32, device=x.device)
    align = moe_align(ids, 1, cfg.block_m)
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    routing = torch.ones(T, dtype=torch.float32, device=x.device)
    D._launch_down(p, cfg, align, x, packed, y, routing, D._Scales(p, None, scale, None, None, x))
    return y


class _DequantizedExperts:
    """Looks like a stacked [E, N, K] weight to ops.experts_reference; indexing one expert
    dequantizes it to bf16 (the naive baseline pays for that on every call)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, scheme: str, group_size: int) -> None:
        self.q, self.scale, self.scheme, self.group_size = q, scale, scheme, group_size
        self.shape = q.shape

    def __getitem__(self, e: int) -> torch.Tensor:
        from mixbuild.plugins import formats as F

        if self.scheme == "fp8":
            w = F.dequantize_fp8(self.q[e:e + 1], self.scale[e:e + 1])
        else:
            w = F.dequantize_int4(self.q[e:e + 1], self.scale[e:e + 1], self.group_size)
        return w[0].to(torch.bfloat16)


class Layer:
    def __init__(self, s: Shape, scheme: str, device: str) -> None:
        q_out, kv_out = s.heads * s.head_dim, s.kv_heads * s.head_dim
        self.qkv = DenseLinear(q_out + 2 * kv_out, s.hidden, scheme, s.group_size, device)
        self.o = DenseLinear(s.hidden, q_out, scheme, s.group_size, device)
        self.router = torch.randn(s.experts, s.hidden, device=device, dtype=torch.bfloat16) * s.hidden ** -0.5
        self.norm1 = torch.ones(s.hidden, device=device, dtype=torch.bfloat16)
        self.norm2 = torch.ones(s.hidden, device=device, dtype=torch.bfloat16)
        self.w_gate_up, self.w_down, self.quant = random_experts(s, scheme, device)

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights and weight scales."""
        tensors = [self.w_gate_up, self.w_down, self.quant["w_gate_up_scale"],
                   self.quant["w_down_scale"]]
        return sum(t[0].numel() * t.element_size() for t in tensors)

    def fixed_bytes(self) -> int:
        return (self.qkv.nbytes() + self.o.nbytes() + 2 * self.router.numel()
                + 4 * self.norm1.numel())


def random_experts(s: Shape, scheme: str, device: str):
    """Expert weights in the scheme's layout (formats.py) with values of a sensible size; the
    values do not matter for speed, only that they stay finite."""
    E, H, I = s.experts, s.hidden, s.intermediate
    if scheme == "fp8":
        w1 = torch.randn(E, 2 * I, H, device=device, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
        w2 = torch.randn(E, H, I, device=device, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
        act = torch.full((1,), 8.0 / 448, device=device)
        quant = dict(scheme="fp8", w_gate_up_scale=torch.full((E, 2 * I), H ** -0.5, device=device),
                     w_down_scale=torch.full((E, H), I ** -0.5, device=device),
                     act_scale_gate_up=act, act_scale_down=act)
        return w1, w2, quant
    g = s.group_size
    w1 = torch.randint(0, 256, (E, 2 * I, H // 2), dtype=torch.uint8, device=device)
    w2 = torch.randint(0, 256, (E, H, I // 2), dtype=torch.uint8, device=device)
    quant = dict(scheme="int4", group_size=g,
                 w_gate_up_scale=torch.full((E, 2 * I, -(-H // g)), 1 / (4.6 * H ** 0.5),
                                            dtype=torch.float16, device=device),
                 w_down_scale=torch.full((E, H, -(-I // g)), 1 / (4.6 * I ** 0.5),
                                         dtype=torch.float16, device=device))
    return w1, w2, quant


@dataclass
class State:
    """The static buffers of one batch size: tokens in, KV caches, the routing of each layer."""

    tokens: torch.Tensor
    write_index: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    caches: list
    routing: list


class DecodeModel:
    def __init__(self, shape: Shape, scheme: str, device: str) -> None:
        s = self.shape = shape
        self.scheme, self.device = scheme, device
        self.embed = torch.randn(s.vocab, s.hidden, device=device, dtype=torch.bfloat16)
        self.lm_head = torch.randn(s.vocab, s.hidden, device=device, dtype=torch.bfloat16) * s.hidden ** -0.5
        self.final_norm = torch.ones(s.hidden, device=device, dtype=torch.bfloat16)
        self.layers = [Layer(s, scheme, device) for _ in range(s.layers)]

    def state(self, batch: int) -> State:
        s, dev = self.shape, self.device
        caches = [tuple(torch.randn(batch, s.kv_heads, s.context, s.head_dim, device=dev,
                                    dtype=torch.bfloat16) for _ in range(2)) for _ in self.layers]
        pos = torch.full((batch, 1), s.context - 1, device=dev)
        inv = 1e6 ** (-torch.arange(0, s.head_dim, 2, device=dev).float() / s.head_dim)
        angles = torch.cat([pos * inv] * 2, dim=-1)[:, None, None, :]      # [B, 1, 1, D]
        return State(tokens=torch.randint(0, s.vocab, (batch,), device=dev),
                     write_index=torch.full((batch,), s.context - 1, device=dev, dtype=torch.int64),
                     cos=angles.cos().to(torch.bfloat16), sin=angles.sin().to(torch.bfloat16),
                     caches=caches,
                     routing=[torch.zeros(batch, s.top_k, dtype=torch.int32, device=dev)
                              for _ in self.layers])

    @torch.inference_mode()
    def step(self, st: State, naive: bool = False) -> torch.Tensor:
        """Logits [B, V] of one decode step (the routing of each layer kept in st.routing)."""
        x = self.embed[st.tokens]
        for layer, (cache_k, cache_v), routing in zip(self.layers, st.caches, st.routing):
            x = x + self._attention(layer, rms_norm(x, layer.norm1), st, cache_k, cache_v, naive)
            x = x + self._moe(layer, rms_norm(x, layer.norm2), routing, naive)
        return rms_norm(x, self.final_norm) @ self.lm_head.T

    def _attention(self, layer: Layer, h, st: State, cache_k, cache_v, naive: bool):
        from mixbuild.model.ops import kv_write_
        from mixbuild.model.reference import rotate_half

        s, B = self.shape, h.shape[0]
        qkv = layer.qkv.naive(h) if naive else layer.qkv(h)
        q_size, kv_size = s.heads * s.head_dim, s.kv_heads * s.head_dim
        q = qkv[:, :q_size].reshape(B, s.heads, 1, s.head_dim)
        k = qkv[:, q_size:q_size + kv_size].reshape(B, s.kv_heads, 1, s.head_dim)
        v = qkv[:, q_size + kv_size:].reshape(B, s.kv_heads, 1, s.head_dim)
        q = q * st.cos + rotate_half(q) * st.sin
        k = k * st.cos + rotate_half(k) * st.sin
        kv_write_(cache_k, k, st.write_index)
        kv_write_(cache_v, v, st.write_index)
        out = gqa(q, cache_k, cache_v).reshape(B, q_size)
        return layer.o.naive(out) if naive else layer.o(out)

    def _moe(self, layer: Layer, h, routing: torch.Tensor, naive: bool):
        logits = h @ layer.router.T
        if naive:
            from mixbuild.model.ops import experts_reference, gate_reference

            weights, ids = gate_reference(logits, self.shape.top_k, True)
            q = layer.quant
            return experts_reference(
                h, weights, ids,
                _DequantizedExperts(layer.w_gate_up, q["w_gate_up_scale"], self.scheme,
                                    self.shape.group_size),
                _DequantizedExperts(layer.w_down, q["w_down_scale"], self.scheme,
                                    self.shape.group_size))
        from mixbuild.plugins.dispatch import moe_experts_triton, moe_gate_triton

        weights, ids = moe_gate_triton(logits, self.shape.top_k, True)
        routing.copy_(ids)
        return moe_experts_triton(h, weights, ids, layer.w_gate_up, layer.w_down, **layer.quant)

    def bytes_read(self, st: State) -> int:
        """The floor's numerator for the routing the last step chose."""
        s = self.shape
        B = st.tokens.shape[0]
        total = 2 * self.lm_head.numel() + 2 * self.final_norm.numel() + 2 * B * s.hidden
        kv = 2 * B * s.kv_heads * s.context * s.head_dim * 2
        for layer, routing in zip(self.layers, st.routing):
            used = int(torch.unique(routing).numel())
            total += layer.fixed_bytes() + kv + used * layer.expert_bytes()
        return total


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def gqa(q, k, v):
    """Grouped-query attention over the whole cache (every position is valid context, so no
    mask, which lets torch pick its fused kernels), without repeating K/V where torch can."""
    try:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    except TypeError:  # an older torch: repeat the KV heads
        rep = q.shape[1] // k.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
