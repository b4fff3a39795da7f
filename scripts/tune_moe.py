"""Tune the MoE expert kernels on this GPU; write a config JSON (see mixbuild/plugins/configs.py).

Shape legend: M (= T) tokens, E experts, k top-k, H hidden, I intermediate.

For each token count M, every candidate KernelConfig (tile sizes, GROUP_SIZE_M, warps, stages) is
timed on a full moe_experts_triton call (both grouped GEMMs, uniform random routing, CUDA-graph
replays), and the fastest one whose output matches the default config's is kept. The file is
written to --out-dir under the name the lookup expects for (E, N=I, K=H, device, dtype).

    python scripts/tune_moe.py --dtype bf16                       # Mixtral-8x7B shapes
    python scripts/tune_moe.py --dtype fp8 --ms 1,16,256 --quick
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import sys
from pathlib import Path

import torch

M_VALUES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096,
            8192)
SHARED_MEMORY_BYTES = 227 * 1024                                 # H100: per-block maximum


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp8", "int4"), default="bf16")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--ms", default=",".join(map(str, M_VALUES)))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a smaller search space")
    parser.add_argument("--out-dir", type=Path,
                        default=Path(__file__).resolve().parents[1] / "mixbuild/plugins/configs")
    return parser.parse_args()


def candidates(M: int, args) -> list:
    """Configs worth timing for M tokens: block_m no larger than needed, shared memory bounded."""
    from mixbuild.plugins.configs import KernelConfig

    slots_per_expert = max(1, M * args.top_k // args.experts)
    block_ms = [m for m in (16, 32, 64, 128) if m <= max(16, 2 * slots_per_expert)]
    space = dict(block_n=(32, 64, 128, 256), block_k=(64, 128, 256), group_m=(1, 16, 32),
                 num_warps=(4, 8), num_stages=(2, 3, 4, 5))
    if args.quick:
        space = dict(block_n=(64, 128), block_k=(64, 128), group_m=(1, 16), num_warps=(4, 8),
                     num_stages=(3, 4))
    weight_bytes = 1 if args.dtype in ("fp8", "int4") else 2
    configs = []
    for block_m, *rest in itertools.product(block_ms, *space.values()):
        cfg = KernelConfig(block_m, *rest)
        # gate_up loads one A tile and two B tiles per stage
        stage_bytes = (cfg.block_m + 2 * cfg.block_n) * cfg.block_k * weight_bytes
        if stage_bytes * cfg.num_stages <= SHARED_MEMORY_BYTES:
            configs.append(cfg)
    return configs


def make_problem(M: int, args, weights: dict) -> dict:
    from mixbuild.model.ops import gate_reference

    logits = torch.randn(M, args.experts, device="cuda")
    routing_weights, ids = gate_reference(logits, args.top_k, True)
    x = torch.randn(M, args.hidden, device="cuda", dtype=weights["dtype"])
    return dict(hidden=x, weights=routing_weights, expert_ids=ids, w_gate_up=weights["w_gate_up"],
                w_down=weights["w_down"], **weights["quant"])


def make_weights(args) -> dict:
    from mixbuild.plugins import formats as F

    E, H, I = args.experts, args.hidden, args.intermediate
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    w_gate_up = (torch.randn(E, 2 * I, H, device="cuda") / H ** 0.5).to(dtype)
    w_down = (torch.randn(E, H, I, device="cuda") / I ** 0.5).to(dtype)
    if args.dtype == "fp8":
        q1, s1 = F.quantize_fp8(w_gate_up, per_channel=True)
        q2, s2 = F.quantize_fp8(w_down, per_channel=True)
        scale = torch.full((1,), 0.02, device="cuda")
        quant = dict(scheme="fp8", w_gate_up_scale=s1, w_down_scale=s2, act_scale_gate_up=scale,
                     act_scale_down=scale)
        return dict(dtype=dtype, w_gate_up=q1, w_down=q2, quant=quant)
    if args.dtype == "int4":
        q1, s1 = F.quantize_int4(w_gate_up, args.group_size)
        q2, s2 = F.quantize_int4(w_down, args.group_size)
        quant = dict(scheme="int4", w_gate_up_scale=s1, w_down_scale=s2,
                     group_size=args.group_size)
        return dict(dtype=dtype, w_gate_up=q1, w_down=q2, quant=quant)
    return dict(dtype=dtype, w_gate_up=w_gate_up, w_down=w_down, quant={})


def tune_one(M: int, args, weights: dict):
    """(best config, its milliseconds, how many candidates ran) for M tokens."""
    from mixbuild.plugins.dispatch import moe_experts_triton
    from mixbuild.plugins.timing import cuda_median_ms

    problem = make_problem(M, args, weights)
    expected = moe_experts_triton(**problem).float()
    tolerance = 0.05 * expected.abs().max().item() + 1e-3
    best, best_ms, ran = None, float("inf"), 0
    for cfg in candidates(M, args):
        try:
            got = moe_experts_triton(**problem, config=cfg).float()
            if (got - expected).abs().max().item() > tolerance:
                print(f"  M={M}: {cfg} disagrees with the default config; skipped")
                continue
            ms = cuda_median_ms(lambda cfg=cfg: moe_experts_triton(**problem, config=cfg),
                                args.reps)
        except Exception as exc:                     # out of resources, compiler limits
            print(f"  M={M}: {cfg} failed: {str(exc).splitlines()[0][:80]}")
            continue
        ran += 1
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best, best_ms, ran


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("scripts/tune_moe.py needs a CUDA GPU and none is visible; nothing tuned.",
              file=sys.stderr)
        return 1
    import triton

    from mixbuild.plugins.configs import config_file_name, device_key, dtype_key, write_config_file

    weights = make_weights(args)
    scheme = weights["quant"].get("scheme", "none")
    table = {}
    for M in (int(m) for m in args.ms.split(",")):
        best, ms, ran = tune_one(M, args, weights)
        if best is None:
            print(f"M={M}: no candidate ran", file=sys.stderr)
            continue
        table[M] = best
        print(f"M={M}: {ms * 1e3:.1f} us with {best} ({ran} candidates)")
    if not table:
        return 1
    device = device_key("cuda")
    name = config_file_name(args.experts, args.intermediate, args.hidden, device,
                            dtype_key(weights["dtype"], scheme))
    meta = {"tuned": True, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "top_k": args.top_k, "reps": args.reps,
            "date": datetime.date.today().isoformat(), "search": "quick" if args.quick else "full"}
    path = write_config_file(args.out_dir / name, table, meta)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
