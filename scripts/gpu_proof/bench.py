"""Stage 4: the expert kernels timed at M tokens, against the measured ceilings and two torch
baselines (the methods of benchmarks/moe_kernels.py: triton, torch-loop, grouped_mm).

Per (dtype, M): weight bytes/s (unique expert weights read, scales included, / time) as a share
of the copy bandwidth; TFLOP/s (6 * M * k * H * I / time) as a share of the dense GEMM rate of
the same input type (int4 is W4A16: against bf16); and the time against each baseline.
"""

from __future__ import annotations

import torch

from gpu_proof.core import SKIPPED_BUDGET, Context, goal, median_seconds

BANDWIDTH_GOAL, BANDWIDTH_MAX_M = 0.70, 16
COMPUTE_GOAL, COMPUTE_MIN_M = 0.50, 2048


def bench_stage(ctx: Context) -> dict:
    from benchmarks.moe_kernels import METHODS, expert_bytes

    p = ctx.profile
    E, k, H, I = p.bench_shape
    copy_bw = ctx.ceilings.get("copy_bytes_per_s")
    dense = ctx.ceilings.get("dense_tflops", {})
    rows, skipped = [], []
    for dtype in p.bench_dtypes:
        if ctx.clock.expired():
            skipped.append({"dtype": dtype, "skipped": SKIPPED_BUDGET})
            continue
        weights = make_weights(dtype, E, H, I, p.group_size, p.device)
        per_expert = expert_bytes(weights)
        ceiling = dense.get("bf16" if dtype == "int4" else dtype)
        for M in p.bench_ms:
            if ctx.clock.expired():
                skipped.append({"dtype": dtype, "M": M, "skipped": SKIPPED_BUDGET})
                continue
            x = torch.randn(M, H, device=p.device, dtype=torch.bfloat16)
            routing_weights, ids = make_routing(M, E, k, p.device)
            used = int(torch.unique(ids).numel())
            row = {"dtype": dtype, "M": M, "experts_used": used, "methods": {}}
            for name, build in METHODS.items():
                row["methods"][name] = time_method(name, build, x, routing_weights, ids, weights,
                                                   p, used * per_expert, 6 * M * k * H * I,
                                                   copy_bw, ceiling)
            row["goals"] = row_goals(row)
            rows.append(row)
        del weights
    goals = summary_goals(rows, skipped)
    return {"passed": bool(rows) and all("error" not in r["methods"]["triton"] for r in rows),
            "shape": {"E": E, "k": k, "H": H, "I": I}, "rows": rows, "skipped_items": skipped,
            "goals": goals}


def make_weights(dtype: str, E: int, H: int, I: int, group_size: int, device: str) -> dict:
    """benchmarks/moe_kernels.make_weights on any device: the benchmarked format plus the bf16
    originals (for the baselines)."""
    from mixbuild.plugins import formats as F

    w_gate_up = (torch.randn(E, 2 * I, H, device=device) / H ** 0.5).to(torch.bfloat16)
    w_down = (torch.randn(E, H, I, device=device) / I ** 0.5).to(torch.bfloat16)
    weights = {"w_gate_up": w_gate_up, "w_down": w_down, "quant": {}, "bf16": (w_gate_up, w_down)}
    if dtype == "fp8":
        q1, s1 = F.quantize_fp8(w_gate_up, per_channel=True)
        q2, s2 = F.quantize_fp8(w_down, per_channel=True)
        scale = torch.full((1,), 0.02, device=device)
        weights.update(w_gate_up=q1, w_down=q2, quant=dict(
            scheme="fp8", w_gate_up_scale=s1, w_down_scale=s2, act_scale_gate_up=scale,
            act_scale_down=scale))
    elif dtype == "int4":
        q1, s1 = F.quantize_int4(w_gate_up, group_size)
        q2, s2 = F.quantize_int4(w_down, group_size)
        weights.update(w_gate_up=q1, w_down=q2, quant=dict(
            scheme="int4", w_gate_up_scale=s1, w_down_scale=s2, group_size=group_size))
    return weights


def make_routing(M: int, E: int, k: int, device: str):
    from mixbuild.model.ops import gate_reference

    return gate_reference(torch.randn(M, E, device=device), k, True)


def time_method(name, build, x, routing_weights, ids, weights, profile, weight_bytes, flops,
                copy_bw, dense_tflops) -> dict:
    try:
        fn = build(x, routing_weights, ids, weights)
        if fn is None:
            return {"error": "not available in this torch"}
        seconds = median_seconds(fn, profile, graph=name != "torch-loop")
    except Exception as exc:        # a torch op missing for this dtype or device
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    tflops = flops / seconds / 1e12
    return {"seconds": seconds, "weight_GBps": weight_bytes / seconds / 1e9,
            "pct_copy": 100 * weight_bytes / seconds / copy_bw if copy_bw else None,
            "tflops": tflops, "pct_dense": 100 * tflops / dense_tflops if dense_tflops else None}


def row_goals(row: dict) -> dict:
    """This (dtype, M)'s goals: bandwidth (small M), compute (large M), beating the baselines."""
    ours = row["methods"]["triton"]
    if "seconds" not in ours:
        return {"faster_than_baselines": False}
    goals = {}
    if row["M"] <= BANDWIDTH_MAX_M and ours["pct_copy"] is not None:
        goals["bandwidth"] = ours["pct_copy"] >= 100 * BANDWIDTH_GOAL
    if row["M"] >= COMPUTE_MIN_M and ours["pct_dense"] is not None:
        goals["compute"] = ours["pct_dense"] >= 100 * COMPUTE_GOAL
    baselines = [m["seconds"] for n, m in row["methods"].items() if n != "triton" and "seconds" in m]
    goals["faster_than_baselines"] = all(ours["seconds"] < s for s in baselines)
    goals["baselines_measured"] = len(baselines)
    return goals


def summary_goals(rows: list[dict], skipped: list[dict]) -> list[dict]:
    def combine(key):
        values = [r["goals"][key] for r in rows if key in r["goals"]]
        if not values:
            return None
        return False if not all(values) else (None if skipped else True)

    missing = sum(1 for r in rows if r["goals"].get("baselines_measured", 0) < 2)
    return [
        goal(f"M<={BANDWIDTH_MAX_M}: >= {BANDWIDTH_GOAL:.0%} of copy bandwidth", combine("bandwidth")),
        goal(f"M>={COMPUTE_MIN_M}: >= {COMPUTE_GOAL:.0%} of the dense GEMM rate", combine("compute")),
        goal("faster than both torch baselines at every M", combine("faster_than_baselines"),
             f"{missing} rows with fewer than two baselines measured" if missing else ""),
    ]
