"""Stage 2: the Triton MoE kernels against mixbuild's reference ops, at the real Mixtral-8x7B
shape and at the odd small shapes of the CPU tests.

References: ops.gate_reference for the gate; ops.experts_reference in float32 on the same
(rounded) inputs for fp32 / bf16; formats.experts_reference_quant (weights dequantized exactly,
fp8 activations fake-quantized) for fp8 / int4. Tolerances are those of tests/plugins/gpu_check.py:
an absolute part plus a part relative to the largest reference output (outputs are O(1)).
"""

from __future__ import annotations

import torch

from gpu_proof.core import SKIPPED_BUDGET, Context, goal

SCHEMES = ("fp32", "bf16", "fp8", "int4")
# scheme -> (atol, rtol of max |reference|)
TOLERANCE = {"fp32": (1e-4, 1e-4), "bf16": (2e-2, 2e-2), "fp8": (0.1, 0.05), "int4": (3e-2, 2e-2)}


def correctness_stage(ctx: Context) -> dict:
    p = ctx.profile
    E, k, H, I = p.real_shape
    shapes = [(T, E, k, H, I) for T in p.correctness_tokens] + list(p.small_shapes)
    gen = torch.Generator().manual_seed(0)
    cases, skipped = [], []
    for T, E, k, H, I in shapes:
        if ctx.clock.expired():
            skipped.append({"shape": [T, E, k, H, I], "skipped": SKIPPED_BUDGET})
            continue
        cases += check_shape(T, E, k, H, I, p.device, gen)
    passed = bool(cases) and all(c["passed"] for c in cases)
    met = False if not passed else (None if skipped else True)   # None: not every shape ran
    return {"passed": passed, "cases": cases, "skipped_items": skipped,
            "goals": [goal("kernels correct at every shape", met,
                           f"{sum(c['passed'] for c in cases)}/{len(cases)} cases within "
                           f"tolerance, {len(skipped)} shapes skipped")]}


def check_shape(T, E, k, H, I, device, gen) -> list[dict]:
    """The gate and every weight scheme at one shape; one record each."""
    from mixbuild.model.ops import gate_reference
    from mixbuild.plugins.dispatch import moe_gate_triton

    shape = [T, E, k, H, I]
    logits = torch.randn(T, E, generator=gen).to(device)
    weights, ids = gate_reference(logits, k, True)
    got_w, got_ids = moe_gate_triton(logits, k, True)
    gate_err = (got_w - weights).abs().max().item()
    records = [{"kernel": "gate", "scheme": "fp32", "shape": shape, "max_error": gate_err,
                "limit": 1e-6, "passed": bool(torch.equal(got_ids, ids)) and gate_err <= 1e-6}]
    w1 = (torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5).to(device)
    w2 = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(device)
    x = torch.randn(T, H, generator=gen).to(device)
    for scheme in SCHEMES:
        if scheme == "fp8" and not fp8_supported(device):
            records.append({"kernel": "experts", "scheme": scheme, "shape": shape,
                            "passed": True, "skipped": "fp8 needs compute capability 8.9+"})
            continue
        got, want = run_scheme(scheme, x, weights, ids, w1, w2, group_size=min(128, H, I))
        err = (got.float() - want.float()).abs().max().item()
        atol, rtol = TOLERANCE[scheme]
        limit = atol + rtol * want.float().abs().max().item()
        records.append({"kernel": "experts", "scheme": scheme, "shape": shape,
                        "max_error": err, "limit": limit, "passed": err <= limit})
    return records


def fp8_supported(device: str) -> bool:
    return device != "cuda" or torch.cuda.get_device_capability() >= (8, 9)


def run_scheme(scheme, x, weights, ids, w1, w2, group_size=128):
    """(kernel output, reference output) for one weight scheme; w1 / w2 float32 originals."""
    from mixbuild.model.ops import experts_reference
    from mixbuild.plugins import formats as F
    from mixbuild.plugins.dispatch import moe_experts_triton

    if scheme in ("fp32", "bf16"):
        dtype = torch.float32 if scheme == "fp32" else torch.bfloat16
        xs, a, b = x.to(dtype), w1.to(dtype), w2.to(dtype)
        want = experts_reference(xs.float(), weights, ids, a.float(), b.float())
        return moe_experts_triton(xs, weights, ids, a, b), want
    xb = x.to(torch.bfloat16)
    if scheme == "int4":
        p1, s1 = F.quantize_int4(w1, group_size)
        p2, s2 = F.quantize_int4(w2, group_size)
        quant = dict(w_gate_up_scale=s1, w_down_scale=s2, group_size=group_size)
        want = F.experts_reference_quant(xb.float(), weights, ids, p1, p2, scheme="int4", **quant)
        return moe_experts_triton(xb, weights, ids, p1, p2, scheme="int4", **quant), want
    q1, f1 = F.quantize_fp8(w1.to(torch.bfloat16), per_channel=True)
    q2, f2 = F.quantize_fp8(w2.to(torch.bfloat16), per_channel=True)
    a1 = F.fp8_activation_scale(xb)
    a2 = (swiglu_amax(xb, w1) / F.FP8_MAX).reshape(1)
    quant = dict(w_gate_up_scale=f1, w_down_scale=f2, act_scale_gate_up=a1)
    want = F.experts_reference_quant(xb, weights, ids, q1, q2, scheme="fp8", **quant)
    got = moe_experts_triton(xb, weights, ids, q1, q2, scheme="fp8", **quant, act_scale_down=a2)
    return got, want


def swiglu_amax(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    """max |silu(x W1^T) * (x W3^T)| over tokens and experts (a calibration stand-in), one
    expert at a time so the real shapes stay small in memory."""
    amax = torch.zeros((), device=x.device)
    for w in w_gate_up:
        gate, up = (x.float() @ w.float().T).chunk(2, dim=-1)
        amax = torch.maximum(amax, (torch.nn.functional.silu(gate) * up).abs().amax())
    return amax
