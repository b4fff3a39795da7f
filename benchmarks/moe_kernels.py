"""MoE expert kernels on a GPU at Mixtral-8x7B shapes: Triton vs torch baselines (CUDA only).

Shape legend: T (= M) tokens, E experts, k top-k, H hidden, I intermediate, S = T * k slots.

For every token count M and routing (uniform: k distinct random experts per token; skewed: router
logits biased so that low expert ids get most tokens) it prints the median time of one MoE call
(CUDA-graph replays timed with CUDA events; the per-expert loop cannot be captured and is timed
eagerly), and from it
  weight GB/s    unique expert weight bytes read (experts with >= 1 token, scales included) / time,
                 and that as % of a measured device-to-device copy bandwidth ((read + write) / time
                 of a 1 GiB copy)
  TFLOP/s        6 * S * H * I / time, and as % of a measured dense GEMM of the same input dtype
                 ([8192, H] x [H, I]; fp8 via torch._scaled_mm, int4 W4A16 against bf16).
Methods: triton (mixbuild, in the benchmarked format); torch-loop (ops.experts_reference, bf16);
grouped_mm (torch._grouped_mm, bf16; for --dtype fp8 torch._scaled_grouped_mm with row-wise
scales), where present. For int4 the torch baselines run the bf16 weights.

    python benchmarks/moe_kernels.py [--dtype bf16|fp8|int4] [--ms 1,16,512] [--routing uniform]
"""

from __future__ import annotations

import argparse
import sys

import torch

M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=("bf16", "fp8", "int4"), default="bf16")
    parser.add_argument("--ms", default=",".join(map(str, M_VALUES)), help="token counts")
    parser.add_argument("--routing", default="uniform,skewed")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=20, help="timed samples per measurement")
    return parser.parse_args()


# ------------------------------------------------------------------------------------- timing

def median_ms(fn, reps: int, graph: bool = True) -> float:
    from mixbuild.plugins.timing import cuda_median_ms

    return cuda_median_ms(fn, reps, graph=graph)


def copy_bandwidth(reps: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps, graph=False)
    return 2 * src.numel() / (ms * 1e-3)


def dense_tflops(dtype: str, H: int, I: int, reps: int) -> float:
    a = torch.randn(8192, H, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(I, H, device="cuda", dtype=torch.bfloat16)
    if dtype == "fp8":
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        ms = median_ms(lambda: torch._scaled_mm(a8, b8.T, one, one, out_dtype=torch.bfloat16),
                       reps, graph=False)
    else:
        ms = median_ms(lambda: a @ b.T, reps, graph=False)
    return 2 * 8192 * H * I / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------------- problems

def make_routing(M: int, E: int, k: int, kind: str):
    from mixbuild.model.ops import gate_reference

    logits = torch.randn(M, E, device="cuda")
    if kind == "skewed":
        logits += torch.linspace(3.0, -3.0, E, device="cuda")
    return gate_reference(logits, k, True)


def make_weights(args) -> dict:
    """Expert weights in the benchmarked format, plus the bf16 originals for the baselines."""
    from mixbuild.plugins import formats as F

    E, H, I = args.experts, args.hidden, args.intermediate
    w_gate_up = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H ** 0.5
    w_down = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I ** 0.5
    weights = {"w_gate_up": w_gate_up, "w_down": w_down, "quant": {}, "bf16": (w_gate_up, w_down)}
    if args.dtype == "fp8":
        q1, s1 = F.quantize_fp8(w_gate_up, per_channel=True)
        q2, s2 = F.quantize_fp8(w_down, per_channel=True)
        weights.update(w_gate_up=q1, w_down=q2, quant=dict(
            scheme="fp8", w_gate_up_scale=s1, w_down_scale=s2,
            act_scale_gate_up=torch.full((1,), 0.02, device="cuda"),
            act_scale_down=torch.full((1,), 0.02, device="cuda")))
    elif args.dtype == "int4":
        q1, s1 = F.quantize_int4(w_gate_up, args.group_size)
        q2, s2 = F.quantize_int4(w_down, args.group_size)
        weights.update(w_gate_up=q1, w_down=q2, quant=dict(
            scheme="int4", w_gate_up_scale=s1, w_down_scale=s2, group_size=args.group_size))
    return weights


def expert_bytes(weights: dict) -> int:
    """Bytes of one expert's weights and weight scales in the benchmarked format."""
    tensors = [weights["w_gate_up"], weights["w_down"]]
    tensors += [v for key, v in weights["quant"].items() if key.startswith("w_")]
    return sum(t[0].numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------------ methods

def triton_method(x, routing_weights, ids, weights):
    from mixbuild.plugins.dispatch import moe_experts_triton

    return lambda: moe_experts_triton(x, routing_weights, ids, weights["w_gate_up"],
                                      weights["w_down"], **weights["quant"])


def loop_method(x, routing_weights, ids, weights):
    from mixbuild.model.ops import experts_reference

    w_gate_up, w_down = weights["bf16"]
    return lambda: experts_reference(x, routing_weights, ids, w_gate_up, w_down)


def grouped_method(x, routing_weights, ids, weights):
    """torch._grouped_mm (bf16) or torch._scaled_grouped_mm (fp8): sort, two grouped GEMMs, add."""
    E, k = weights["bf16"][0].shape[0], ids.shape[1]
    scaled = weights["quant"].get("scheme") == "fp8"
    if not hasattr(torch, "_scaled_grouped_mm" if scaled else "_grouped_mm"):
        return None
    w1 = weights["w_gate_up"] if scaled else weights["bf16"][0]
    w2 = weights["w_down"] if scaled else weights["bf16"][1]

    def gemm(a, w, scale_b, a_scale):
        if not scaled:
            return torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
        aq = (a.float() / a_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        rows = torch.full((a.shape[0],), float(a_scale), device=a.device)
        return torch._scaled_grouped_mm(aq, w.transpose(1, 2), rows, scale_b, offs=offs,
                                        out_dtype=torch.bfloat16)

    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tokens = order // k
    quant = weights["quant"]

    def run():
        a = x[tokens]
        gate, up = gemm(a, w1, quant.get("w_gate_up_scale"), 0.02).chunk(2, dim=-1)
        y = gemm(torch.nn.functional.silu(gate) * up, w2, quant.get("w_down_scale"), 0.02)
        y = y.float() * routing_weights.reshape(-1)[order, None]
        return torch.zeros(x.shape, device=x.device).index_add_(0, tokens, y)

    return run


METHODS = {"triton": triton_method, "torch-loop": loop_method, "grouped_mm": grouped_method}


# --------------------------------------------------------------------------------------- main

def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/moe_kernels.py needs a CUDA GPU and none is visible; nothing measured.",
              file=sys.stderr)
        return 1
    from mixbuild.plugins.dispatch import register_cuda_kernels

    register_cuda_kernels()
    E, k, H, I = args.experts, args.top_k, args.hidden, args.intermediate
    weights = make_weights(args)
    per_expert = expert_bytes(weights)
    copy_bw = copy_bandwidth(args.reps)
    dense = dense_tflops(args.dtype, H, I, args.reps)
    print(f"{torch.cuda.get_device_name()}  dtype={args.dtype}  E={E} k={k} H={H} I={I}  "
          f"copy={copy_bw / 1e9:.0f} GB/s  dense={dense:.0f} TFLOP/s")
    print(f"{'M':>5} {'routing':>8} {'method':>11} {'us':>9} {'GB/s':>7} {'%copy':>6} "
          f"{'TFLOP/s':>8} {'%dense':>6} {'experts':>7}")
    for M in (int(m) for m in args.ms.split(",")):
        x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
        for kind in args.routing.split(","):
            routing_weights, ids = make_routing(M, E, k, kind)
            used = int(torch.unique(ids).numel())
            for name, build in METHODS.items():
                fn = build(x, routing_weights, ids, weights)
                if fn is None:
                    continue
                try:
                    ms = median_ms(fn, args.reps, graph=name != "torch-loop")
                except RuntimeError as exc:            # e.g. a torch op missing on this GPU
                    print(f"{M:>5} {kind:>8} {name:>11}  n/a ({str(exc).splitlines()[0][:60]})")
                    continue
                gbs = used * per_expert / (ms * 1e-3) / 1e9
                tflops = 6 * M * k * H * I / (ms * 1e-3) / 1e12
                print(f"{M:>5} {kind:>8} {name:>11} {ms * 1e3:>9.1f} {gbs:>7.0f} "
                      f"{100 * gbs * 1e9 / copy_bw:>5.0f}% {tflops:>8.1f} "
                      f"{100 * tflops / dense:>5.0f}% {used:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
