"""Launchers for the Triton MoE kernels and their registration as CUDA kernels of the torch ops.

Shape legend: T tokens, E experts, H hidden, I intermediate, k top-k, S = T * k slots.

    moe_gate_triton(router_logits [T, E], top_k, normalize) -> (weights [T, k] f32, ids [T, k] i32)
    moe_experts_triton(hidden [T, H], weights [T, k], ids [T, k], w_gate_up, w_down, *,
                       scheme, scales...) -> out [T, H]
    register_cuda_kernels()  makes mixbuild::moe_gate / mixbuild::moe_experts use them on CUDA

Expert pipeline (no host synchronisation, so it can be captured in a CUDA graph):
    1. moe_align groups the S slots by expert, padded per expert to BLOCK_M;
    2. gate_up_kernel: inter [S, I] = silu(x W1^T) * (x W3^T), one expert per tile;
    3. down_kernel:    y [S, H] = routing weight * inter W2^T;
    4. combine:        out[t] = sum of y over the k slots of token t (float32 sum).
Triton is imported on first use; without it these raise MissingDependencyError (extra 'gpu').
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from mixbuild.contract import QuantScheme
from mixbuild.errors import UsageError, require
from mixbuild.plugins.align import align_capacity, moe_align
from mixbuild.plugins.configs import KernelConfig, device_key, dtype_key, get_config
from mixbuild.plugins.formats import DEFAULT_GROUP_SIZE
from mixbuild.plugins.problem import ExpertsProblem, describe_experts

DISABLE_ENV = "MIXBUILD_DISABLE_TRITON"   # "1": register_cuda_kernels registers nothing
_SCHEME_CODE = {QuantScheme.NONE: 0, QuantScheme.FP8: 1, QuantScheme.INT4: 2}
_ALIGN_BYTES = 256


def kernels():
    """The triton_kernels module (imports triton)."""
    require("triton", "gpu", "the Triton MoE kernels")
    return importlib.import_module("mixbuild.plugins.triton_kernels")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# --------------------------------------------------------------------------------------- gate

def moe_gate_triton(router_logits: Tensor, top_k: int, normalize: bool, *,
                    out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """router_logits [T, E] -> (weights f32 [T, k], expert_ids i32 [T, k]), as gate_reference.

    `out` optionally supplies the two output buffers (contiguous).
    """
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        raise UsageError("router logits must be a float [T, E] tensor",
                         found=f"{list(router_logits.shape)} {router_logits.dtype}")
    T, E = router_logits.shape
    if not 1 <= top_k <= E:
        raise UsageError("top_k is out of range", expected=f"1 <= top_k <= E = {E}",
                         found=str(top_k))
    device = router_logits.device
    weights, ids = out if out is not None else (
        torch.empty(T, top_k, dtype=torch.float32, device=device),
        torch.empty(T, top_k, dtype=torch.int32, device=device))
    if T == 0:
        return weights, ids
    block_e = max(2, 1 << (E - 1).bit_length())
    block_t = max(1, min(64, 4096 // block_e))
    kernels().moe_gate_kernel[(-(-T // block_t),)](
        router_logits, weights, ids, T, E, router_logits.stride(0), router_logits.stride(1),
        TOP_K=top_k, NORMALIZE=bool(normalize), BLOCK_T=block_t, BLOCK_E=block_e)
    return weights, ids


# ------------------------------------------------------------------------------------ experts

def moe_experts_triton(hidden: Tensor, weights: Tensor, expert_ids: Tensor, w_gate_up: Tensor,
                       w_down: Tensor, *, scheme: QuantScheme | str = "none",
                       w_gate_up_scale: Tensor | None = None, w_down_scale: Tensor | None = None,
                       act_scale_gate_up: Tensor | None = None,
                       act_scale_down: Tensor | None = None,
                       group_size: int = DEFAULT_GROUP_SIZE, config: KernelConfig | None = None,
                       out: Tensor | None = None, workspace: Tensor | None = None) -> Tensor:
    """Sparse SwiGLU experts like ops.experts_reference, for any weight scheme in formats.py.

    hidden [T, H]; weights [T, k] float; expert_ids [T, k] in [0, E) (not range-checked: that would
    need a host sync); w_gate_up / w_down and scales as formats.py defines for `scheme`.
    `config` overrides the tuned / default kernel config; `out` [T, H] receives the result;
    `workspace` (uint8, at least experts_workspace_bytes(...)) holds the temporaries.
    """
    scheme = QuantScheme.parse(scheme)
    p = describe_experts(hidden, weights, expert_ids, w_gate_up, w_down, scheme,
                         w_gate_up_scale=w_gate_up_scale, w_down_scale=w_down_scale,
                         act_scale_gate_up=act_scale_gate_up, act_scale_down=act_scale_down,
                         group_size=group_size)
    out = out if out is not None else torch.empty_like(hidden)
    if p.T == 0 or p.k == 0:
        return out.zero_()
    cfg = config or kernel_config(p, hidden.device)
    if cfg.problems():
        raise UsageError("invalid MoE kernel config", found="; ".join(cfg.problems()))
    arena = _Arena(workspace, hidden.device)
    align = moe_align(expert_ids, p.E, cfg.block_m, out=_align_buffers(arena, p, cfg.block_m))
    inter = arena.take((p.num_slots, p.I), _inter_dtype(p))
    y = arena.take((p.num_slots, p.H), hidden.dtype)
    scales = _Scales(p, w_gate_up_scale, w_down_scale, act_scale_gate_up, act_scale_down, hidden)
    _launch_gate_up(p, cfg, align, hidden, w_gate_up, inter, scales)
    _launch_down(p, cfg, align, inter, w_down, y, weights.reshape(-1).float(), scales)
    out.copy_(torch.sum(y.view(p.T, p.k, p.H), dim=1, dtype=torch.float32))
    return out


def kernel_config(p: ExpertsProblem, device: torch.device) -> KernelConfig:
    """The stored (or default) config for this problem on this device."""
    return get_config(p.T, E=p.E, N=p.I, K=p.H, device=device_key(device),
                      dtype=dtype_key(p.dtype, p.scheme.value), top_k=p.k)


def experts_workspace_bytes(T: int, k: int, E: int, H: int, I: int, dtype: torch.dtype,
                            scheme: QuantScheme | str = "none", block_m: int = 256) -> int:
    """Bytes of workspace moe_experts_triton needs for T tokens with tiles of at most block_m."""
    scheme = QuantScheme.parse(scheme)
    slots = T * k
    capacity = align_capacity(slots, E, block_m)
    inter_size = 1 if scheme is QuantScheme.FP8 else dtype.itemsize
    sizes = (capacity * 4, capacity // 16 * 4, 4, slots * I * inter_size,
             slots * H * dtype.itemsize)
    return sum(_round_up(size) for size in sizes)


class _Arena:
    """Carves aligned tensors out of a uint8 workspace, or allocates when there is none."""

    def __init__(self, buffer: Tensor | None, device: torch.device) -> None:
        self.buffer, self.device, self.offset = buffer, device, 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        if self.buffer is None:
            return torch.empty(shape, dtype=dtype, device=self.device)
        nbytes = _round_up(max(1, dtype.itemsize * _numel(shape)))
        if self.offset + nbytes > self.buffer.numel():
            raise UsageError("MoE workspace is too small",
                             expected=f">= {self.offset + nbytes} bytes",
                             found=f"{self.buffer.numel()} bytes")
        chunk = self.buffer[self.offset:self.offset + dtype.itemsize * _numel(shape)]
        self.offset += nbytes
        return chunk.view(dtype).view(shape)


def _align_buffers(arena: _Arena, p: ExpertsProblem, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    capacity = align_capacity(p.num_slots, p.E, block_m)
    return (arena.take((capacity,), torch.int32), arena.take((capacity // block_m,), torch.int32),
            arena.take((1,), torch.int32))


def _inter_dtype(p: ExpertsProblem) -> torch.dtype:
    return torch.uint8 if p.scheme is QuantScheme.FP8 else p.dtype


class _Scales:
    """Kernel arguments for the scales of one call: tensors (or a dummy) and their strides."""

    def __init__(self, p: ExpertsProblem, w_gate_up_scale, w_down_scale, act_gate_up, act_down,
                 dummy: Tensor) -> None:
        self.per_channel_gate_up = w_gate_up_scale is not None and w_gate_up_scale.dim() >= 2
        self.per_channel_down = w_down_scale is not None and w_down_scale.dim() >= 2
        self.w_gate_up, self.w_gate_up_strides = _weight_scale(w_gate_up_scale, dummy)
        self.w_down, self.w_down_strides = _weight_scale(w_down_scale, dummy)
        self.act_gate_up, self.act_gate_up_stride = _act_scale(act_gate_up, p.E, dummy)
        self.act_down, self.act_down_stride = _act_scale(act_down, p.E, dummy)


def _weight_scale(scale: Tensor | None, dummy: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    if scale is None:
        return dummy, (0, 0, 0)
    strides = tuple(scale.stride()) + (0,) * (3 - scale.dim())
    return scale, strides


def _act_scale(scale: Tensor | None, E: int, dummy: Tensor) -> tuple[Tensor, int]:
    if scale is None:
        return dummy, 0
    flat = scale.reshape(-1).float()
    return flat, (1 if flat.numel() == E and E > 1 else 0)


def _flags(p: ExpertsProblem) -> dict:
    plain_fp32 = p.dtype == torch.float32 and p.scheme is not QuantScheme.FP8
    upcast = interpreting() and p.scheme is not QuantScheme.FP8
    return {"SCHEME": _SCHEME_CODE[p.scheme], "DOT_FP32": plain_fp32 or upcast}


def _launch_args(cfg: KernelConfig) -> dict:
    return {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
            "GROUP_M": cfg.group_m, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _launch_gate_up(p, cfg, align, hidden, w_gate_up, inter, s: _Scales) -> None:
    grid = (align.num_blocks * -(-p.I // cfg.block_n),)
    kernels().gate_up_kernel[grid](
        hidden, w_gate_up.view(torch.uint8) if p.scheme is QuantScheme.FP8 else w_gate_up, inter,
        s.w_gate_up, s.act_gate_up, s.act_down,
        align.sorted_slots, align.block_expert, align.num_padded,
        align.num_blocks, p.I, p.H, p.num_slots, p.k, max(p.group_size, 1),
        hidden.stride(0), hidden.stride(1), *w_gate_up.stride(), *inter.stride(),
        *s.w_gate_up_strides, s.act_gate_up_stride, s.act_down_stride,
        PER_CHANNEL=s.per_channel_gate_up, EMULATE_FP8=interpreting(), **_flags(p),
        **_launch_args(cfg))


def _launch_down(p, cfg, align, inter, w_down, y, routing, s: _Scales) -> None:
    grid = (align.num_blocks * -(-p.H // cfg.block_n),)
    kernels().down_kernel[grid](
        inter, w_down.view(torch.uint8) if p.scheme is QuantScheme.FP8 else w_down, y,
        s.w_down, s.act_down, routing,
        align.sorted_slots, align.block_expert, align.num_padded,
        align.num_blocks, p.H, p.I, p.num_slots, max(p.group_size, 1),
        *inter.stride(), *w_down.stride(), *y.stride(), *s.w_down_strides, s.act_down_stride,
        PER_CHANNEL=s.per_channel_down, **_flags(p), **_launch_args(cfg))


def _round_up(nbytes: int) -> int:
    return -(-nbytes // _ALIGN_BYTES) * _ALIGN_BYTES


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


# ------------------------------------------------------------------------------ registration

_registered = False


def register_cuda_kernels() -> bool:
    """Make mixbuild::moe_gate and mixbuild::moe_experts run the Triton kernels on CUDA tensors.

    Returns False (registering nothing, so CUDA calls keep the reference implementation) when
    triton is not installed or MIXBUILD_DISABLE_TRITON=1. Cheap and idempotent: triton itself is
    imported on the first CUDA call.
    """
    global _registered
    if _registered:
        return True
    if os.environ.get(DISABLE_ENV) == "1" or importlib.util.find_spec("triton") is None:
        return False
    import mixbuild.model.ops  # noqa: F401  (defines the custom ops)

    torch.library.register_kernel("mixbuild::moe_gate", "cuda", _moe_gate_cuda)
    torch.library.register_kernel("mixbuild::moe_experts", "cuda", _moe_experts_cuda)
    _registered = True
    return True


def _moe_gate_cuda(router_logits: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    return moe_gate_triton(router_logits, top_k, normalize)


def _moe_experts_cuda(hidden: Tensor, weights: Tensor, expert_ids: Tensor, w_gate_up: Tensor,
                      w_down: Tensor) -> Tensor:
    return moe_experts_triton(hidden, weights, expert_ids, w_gate_up, w_down)
