"""The MoE kernels compiled and run on a real CUDA GPU, against the torch references.

Run in a process without TRITON_INTERPRET: python -m tests.plugins.gpu_check
(test_gpu.py does so when a GPU is visible). Exits non-zero on the first mismatch.
`python -m tests.plugins.gpu_check cpu` runs the same checks in Triton's interpreter (slow).
"""

from __future__ import annotations

import os
import sys

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"
if DEVICE == "cuda":
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from mixbuild.model.ops import experts_reference, gate_reference  # noqa: E402
from mixbuild.plugins import formats as F  # noqa: E402
from mixbuild.plugins.dispatch import moe_experts_triton, moe_gate_triton, register_cuda_kernels  # noqa: E402
from tests.plugins.helpers import swiglu_amax  # noqa: E402


def problem(T, E, k, H, I, dtype, gen):
    logits = torch.randn(T, E, generator=gen).to(DEVICE)
    weights, ids = gate_reference(logits, k, True)
    w_gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5).to(DEVICE, dtype)
    w_down = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(DEVICE, dtype)
    x = torch.randn(T, H, generator=gen).to(DEVICE, dtype)
    return logits, x, weights, ids, w_gate_up, w_down


def close(name, got, want, atol, rtol=0.0):
    err = (got.float() - want.float()).abs().max().item()
    limit = atol + rtol * want.float().abs().max().item()
    print(f"{'ok  ' if err <= limit else 'FAIL'} {name}: max error {err:.3g} (limit {limit:.3g})")
    if err > limit:
        raise SystemExit(1)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    for T, E, k, H, I in [(1, 8, 2, 256, 512), (37, 8, 2, 256, 512), (300, 5, 3, 200, 344)]:
        logits, x, weights, ids, w1, w2 = problem(T, E, k, H, I, torch.bfloat16, gen)
        got_w, got_ids = moe_gate_triton(logits.bfloat16(), k, True)
        want_w, want_ids = gate_reference(logits.bfloat16(), k, True)
        assert torch.equal(got_ids, want_ids), "gate ids differ"
        close(f"gate T={T}", got_w, want_w, 1e-6)
        ref32 = experts_reference(x.float(), weights, ids, w1.float(), w2.float())
        close(f"bf16 experts T={T}", moe_experts_triton(x, weights, ids, w1, w2), ref32, 2e-2, 2e-2)
        close(f"fp32 experts T={T}", moe_experts_triton(x.float(), weights, ids, w1.float(),
                                                        w2.float()), ref32, 1e-4, 1e-4)
        p1, s1 = F.quantize_int4(w1, 128)
        p2, s2 = F.quantize_int4(w2, 128)
        quant = dict(w_gate_up_scale=s1, w_down_scale=s2, group_size=128)
        want = F.experts_reference_quant(x.float(), weights, ids, p1, p2, scheme="int4", **quant)
        got = moe_experts_triton(x, weights, ids, p1, p2, scheme="int4", **quant)
        close(f"int4 experts T={T}", got, want, 3e-2, 2e-2)
        if DEVICE != "cuda" or torch.cuda.get_device_capability() >= (8, 9):
            q1, f1 = F.quantize_fp8(w1, per_channel=True)
            q2, f2 = F.quantize_fp8(w2, per_channel=True)
            a1 = F.fp8_activation_scale(x)
            a2 = (swiglu_amax(x, w1) / F.FP8_MAX).reshape(1)
            quant = dict(w_gate_up_scale=f1, w_down_scale=f2, act_scale_gate_up=a1)
            want = F.experts_reference_quant(x, weights, ids, q1, q2, scheme="fp8", **quant)
            got = moe_experts_triton(x, weights, ids, q1, q2, scheme="fp8", **quant,
                                     act_scale_down=a2)
            close(f"fp8 experts T={T}", got, want, 0.1, 0.05)
    if DEVICE != "cuda":
        return
    graph = torch.cuda.CUDAGraph()
    out = moe_experts_triton(x, weights, ids, w1, w2)
    with torch.cuda.graph(graph):
        captured = moe_experts_triton(x, weights, ids, w1, w2)
    graph.replay()
    close("CUDA graph replay", captured, out, 0.0)
    assert register_cuda_kernels()
    close("torch.ops.mixbuild.moe_experts on CUDA",
          torch.ops.mixbuild.moe_experts(x, weights, ids, w1, w2), out, 0.0)


if __name__ == "__main__":
    main()
