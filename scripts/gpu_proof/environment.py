"""Stage 1: what the machine is, and the two ceilings the later stages are judged against.

copy bandwidth: a device-to-device copy of `copy_bytes`, counting bytes read plus written (the
rate at which weights can stream from memory, the decode floor's denominator); dense GEMM rate:
[n, n] x [n, n] in bf16, and in fp8 through torch._scaled_mm where the GPU has it.
"""

from __future__ import annotations

import platform

import torch

from gpu_proof.core import Context, median_seconds


def environment_stage(ctx: Context) -> dict:
    p = ctx.profile
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "triton": _version("triton"), "onnxruntime": _version("onnxruntime"),
            "cuda_available": torch.cuda.is_available(), "device": p.device,
            "triton_interpreter": p.dry_run}
    if p.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory,
                    compute_capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        info["gpu"] = None
    copy = copy_bandwidth(p.copy_bytes, ctx)
    dense = {"bf16": gemm_tflops(p.gemm_size, "bf16", ctx)}
    try:
        dense["fp8"] = gemm_tflops(p.gemm_size, "fp8", ctx)
    except (RuntimeError, NotImplementedError, AttributeError) as exc:  # no fp8 GEMM here
        dense["fp8"] = None
        info["fp8_gemm_error"] = str(exc).splitlines()[0][:200]
    ctx.ceilings.update(copy_bytes_per_s=copy, dense_tflops=dense)
    return {"environment": info, "copy_bandwidth_GBps": round(copy / 1e9, 2),
            "dense_tflops": {k: (round(v, 2) if v else v) for k, v in dense.items()},
            "goals": []}


def _version(module: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def copy_bandwidth(nbytes: int, ctx: Context) -> float:
    """Bytes/s of a device-to-device copy, read + written (as benchmarks/moe_kernels.py)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=ctx.profile.device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), ctx.profile, graph=False)
    return 2 * nbytes / seconds


def gemm_tflops(n: int, dtype: str, ctx: Context) -> float:
    device = ctx.profile.device
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    if dtype == "fp8":
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        fn = lambda: torch._scaled_mm(a8, b8.T, one, one, out_dtype=torch.bfloat16)  # noqa: E731
    else:
        fn = lambda: a @ b.T  # noqa: E731
    return 2 * n ** 3 / median_seconds(fn, ctx.profile, graph=False) / 1e12
