"""Stage 6: a short tuning pass (the search space of scripts/tune_moe.py) for this GPU, written
as kernel config JSON into OUT_DIR/configs under the names mixbuild/plugins/configs.py looks up.

scripts/tune_moe.py times every candidate; here the time is whatever the budget has left, so
each token count gets the default config plus an even spread of at most `per_m` candidates,
and the pass stops (writing what it has) when the stage's clock runs out. A candidate is kept
only when its output matches the default config's, as in tune_moe.tune_one.
"""

from __future__ import annotations

import argparse
import datetime

import torch

from gpu_proof.core import SKIPPED_BUDGET, Context, median_seconds

GPU_PLAN = (("fp8", (1, 16, 64, 512, 2048)), ("int4", (1, 16, 64)), ("bf16", (1, 64, 2048)))
DRY_PLAN = (("bf16", (1, 16)),)


def tuning_stage(ctx: Context) -> dict:
    from mixbuild.plugins.configs import config_file_name, device_key, dtype_key, write_config_file

    p = ctx.profile
    E, k, H, I = p.real_shape
    per_m = 2 if p.dry_run else 6
    results, skipped, files = [], [], []
    for dtype, ms in (DRY_PLAN if p.dry_run else GPU_PLAN):
        if ctx.clock.expired(reserve=5):
            skipped.append({"dtype": dtype, "skipped": SKIPPED_BUDGET})
            continue
        from gpu_proof.bench import make_weights

        weights = make_weights(dtype, E, H, I, p.group_size, p.device)
        args = argparse.Namespace(experts=E, top_k=k, dtype=dtype, quick=True)
        table = {}
        for M in ms:
            if ctx.clock.expired(reserve=5):
                skipped.append({"dtype": dtype, "M": M, "skipped": SKIPPED_BUDGET})
                continue
            found = tune_m(M, args, weights, p, ctx, per_m, H)
            results.append({"dtype": dtype, "M": M, **found})
            if found.get("best") is not None:
                table[M] = found.pop("config")
        if table:
            name = config_file_name(E, I, H, device_key(p.device),
                                    dtype_key(torch.bfloat16, weights["quant"].get("scheme", "none")))
            meta = {"tuned": True, "device": device_name(p.device), "torch": torch.__version__,
                    "top_k": k, "reps": p.reps, "date": datetime.date.today().isoformat(),
                    "search": f"gpu_proof (at most {per_m} candidates per M)"}
            write_config_file(ctx.out_dir / "configs" / name, table, meta)
            files.append(f"configs/{name}")
        del weights
    ctx.files.extend(files)
    for r in results:
        r.pop("config", None)
    return {"passed": bool(files), "results": results, "skipped_items": skipped,
            "config_files": files, "goals": []}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def tune_m(M: int, args, weights: dict, profile, ctx: Context, per_m: int, H: int) -> dict:
    """The fastest of the default config and a spread of tune_moe.candidates for M tokens."""
    from tune_moe import candidates

    from mixbuild.model.ops import gate_reference
    from mixbuild.plugins.configs import default_config
    from mixbuild.plugins.dispatch import moe_experts_triton

    routing_weights, ids = gate_reference(torch.randn(M, args.experts, device=profile.device),
                                          args.top_k, True)
    x = torch.randn(M, H, device=profile.device, dtype=torch.bfloat16)
    problem = dict(hidden=x, weights=routing_weights, expert_ids=ids,
                   w_gate_up=weights["w_gate_up"], w_down=weights["w_down"], **weights["quant"])
    default = default_config(M, args.experts, args.top_k)
    expected = moe_experts_triton(**problem, config=default).float()
    tolerance = 0.05 * expected.abs().max().item() + 1e-3
    pool = [c for c in candidates(M, args) if c != default]
    stride = max(1, len(pool) // max(per_m, 1))
    tried = [default] + pool[::stride][:per_m]
    best, best_s, ran, default_s = None, float("inf"), 0, None
    for cfg in tried:
        if ctx.clock.expired(reserve=2):
            break
        try:
            got = moe_experts_triton(**problem, config=cfg).float()
            if (got - expected).abs().max().item() > tolerance:
                continue
            seconds = median_seconds(lambda cfg=cfg: moe_experts_triton(**problem, config=cfg),
                                     profile)
        except Exception:                       # out of resources, compiler limits
            continue
        ran += 1
        if cfg == default:
            default_s = seconds
        if seconds < best_s:
            best, best_s = cfg, seconds
    out = {"candidates": len(tried), "ran": ran, "default_us": _us(default_s),
           "best_us": _us(best_s if best is not None else None), "config": best,
           "best": None if best is None else best.to_json()}
    if default_s and best is not None:
        out["speedup_vs_default"] = default_s / best_s
    return out


def _us(seconds) -> float | None:
    return None if seconds is None else seconds * 1e6
