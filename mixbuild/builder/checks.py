"""Refusals that happen before anything is built or written.

Each check raises UsageError with what was asked, what is possible and what to do instead.
The precision floors are data, measured with the TensorRT-RTX 1.7 builder (its code generator
refuses "HW-specific datatypes" below them: fp8_e4m3 below SM 8.9, int4 and b16 below SM 8.0).
"""

from __future__ import annotations

from mixbuild.builder.adapter import Adapter
from mixbuild.builder.options import ComputeCapability, MoEMode
from mixbuild.contract import DType, EngineBackend
from mixbuild.errors import UsageError
from mixbuild.exporter.artifact import Artifact

# The lowest compute capability that runs a float dtype (the quantized schemes carry their own
# floors: Scheme.trt_min_sm, trt_min_version).
MIN_COMPUTE_CAPABILITY = {
    DType.BF16: (ComputeCapability(8, 0), "BF16 needs Ampere (8.0) or newer"),
}


def resolve_target(adapter: Adapter, requested: ComputeCapability | None) -> ComputeCapability:
    """The compute capability to build for; refuses one the backend cannot target here."""
    from mixbuild.builder.adapter import local_compute_capability

    label, targets = adapter.backend.label, adapter.targets()
    if not adapter.ahead_of_time:
        if not targets:
            raise UsageError(f"{label} builds engines for the GPU it runs on, and no CUDA GPU is "
                             "visible here", hint="build on the target GPU, or use --backend "
                                                  "tensorrt-rtx to compile ahead of time on a CPU")
        if requested is not None and requested != targets[0]:
            raise UsageError(f"{label} cannot build for compute capability {requested} here",
                             expected=f"the local GPU's, {targets[0]}",
                             hint="build on a GPU of that kind, or omit --compute-capability")
        return targets[0]
    if requested is None:
        requested = local_compute_capability()
        if requested is None:
            raise UsageError(f"no GPU here to build for: {label} needs --compute-capability",
                             expected=", ".join(map(str, targets)))
    if requested not in targets:
        hint = ("use --backend tensorrt on the target GPU (TensorRT-RTX targets GeForce/RTX "
                "architectures, not data-center GPUs such as H100 = 9.0)"
                if adapter.backend is EngineBackend.TENSORRT_RTX else None)
        raise UsageError(f"{label} {adapter.version} cannot target compute capability {requested}",
                         expected=", ".join(map(str, targets)), found=str(requested), hint=hint)
    return requested


def check_precision(adapter: Adapter, artifact: Artifact, cc: ComputeCapability) -> None:
    """The artifact's data types against the target and the backend version."""
    scheme = artifact.scheme
    floors = [MIN_COMPUTE_CAPABILITY.get(artifact.dtype)]
    if scheme.trt_min_sm:
        floors.insert(0, (ComputeCapability(*scheme.trt_min_sm), scheme.trt_min_sm_why))
    for floor in filter(None, floors):
        if cc < floor[0]:
            raise UsageError(f"the {artifact.precision.value} artifact cannot run on compute "
                             f"capability {cc}: {floor[1]}", expected=f">= {floor[0]}",
                             found=str(cc), hint="choose a newer --compute-capability, or export "
                                                 "the model in a precision this GPU supports")
    needed = scheme.trt_min_version.get(adapter.backend.value)
    if needed and _version(adapter.version) < needed:
        raise UsageError(f"{adapter.backend.label} {adapter.version} cannot import {scheme.trt_ops}",
                         expected=f"{adapter.backend.label} >= {'.'.join(map(str, needed))}",
                         hint=f"pip install -U 'mixbuild[{adapter.backend.extra}]'")


def check_ops(adapter: Adapter, ops: dict[str, str], mode: MoEMode) -> None:
    """Every op the parser will import, in this MoE mode, has an importer in this backend."""
    gaps = adapter.op_gaps(ops)
    if not gaps:
        return
    lines = "; ".join(f"{op}: {why}" for op, why in sorted(gaps.items()))
    other = "--moe plugin" if mode is MoEMode.INLINE else "another backend"
    raise UsageError(f"{adapter.backend.label} cannot build this artifact with --moe {mode.value}",
                     found=lines, hint=f"use {other}" + (
                         " (the MoE plugins replace the function bodies that use these ops)"
                         if mode is MoEMode.INLINE else ""))


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
