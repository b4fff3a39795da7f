"""Validation of MoEExperts inputs: shapes, dtypes and scales of every weight scheme.

Shape legend: T tokens, E experts, H hidden, I intermediate, k top-k, G int4 group size.
Layouts are defined in formats.py. Everything here raises UsageError naming the bad input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mixbuild.contract import QuantScheme
from mixbuild.errors import UsageError
from mixbuild.plugins.formats import check_group_size

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_STORAGE = (torch.float8_e4m3fn, torch.uint8)


@dataclass(frozen=True)
class ExpertsProblem:
    """The sizes of one MoEExperts call, after validation."""

    T: int
    H: int
    I: int
    E: int
    k: int
    scheme: QuantScheme
    dtype: torch.dtype
    group_size: int = 0

    @property
    def num_slots(self) -> int:
        return self.T * self.k


def describe_experts(hidden: Tensor, weights: Tensor, expert_ids: Tensor, w_gate_up: Tensor,
                     w_down: Tensor, scheme: QuantScheme, *, w_gate_up_scale: Tensor | None,
                     w_down_scale: Tensor | None, act_scale_gate_up: Tensor | None,
                     act_scale_down: Tensor | None, group_size: int) -> ExpertsProblem:
    """Check every input against the layout of `scheme`; return the problem sizes."""
    _expect(hidden.dim() == 2 and hidden.dtype in ACTIVATION_DTYPES, "hidden",
            "[T, H] float32 / float16 / bfloat16", hidden)
    T, H = hidden.shape
    _expect(expert_ids.dim() == 2 and expert_ids.shape[0] == T
            and not expert_ids.is_floating_point(), "expert_ids", f"[{T}, k] integer", expert_ids)
    k = expert_ids.shape[1]
    _expect(weights.shape == expert_ids.shape and weights.is_floating_point(), "weights",
            f"[{T}, {k}] float", weights)
    _expect(w_gate_up.dim() == 3 and w_gate_up.shape[1] % 2 == 0, "w_gate_up",
            "[E, 2I, H] (or [E, 2I, H/2] packed int4)", w_gate_up)
    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    devices = {t.device for t in (hidden, weights, expert_ids, w_gate_up, w_down)}
    if len(devices) != 1:
        raise UsageError("MoE expert inputs live on different devices", expected="one device",
                         found=", ".join(sorted(map(str, devices))))
    problem = ExpertsProblem(T, H, I, E, k, scheme, hidden.dtype,
                             group_size if scheme is QuantScheme.INT4 else 0)
    _CHECKS[scheme](problem, hidden, w_gate_up, w_down, w_gate_up_scale, w_down_scale,
                    act_scale_gate_up, act_scale_down)
    return problem


def _check_plain(p: ExpertsProblem, hidden, w_gate_up, w_down, *_scales) -> None:
    _expect_weight("w_gate_up", w_gate_up, (p.E, 2 * p.I, p.H), (hidden.dtype,))
    _expect_weight("w_down", w_down, (p.E, p.H, p.I), (hidden.dtype,))


def _check_fp8(p: ExpertsProblem, hidden, w_gate_up, w_down, w_gate_up_scale, w_down_scale,
               act_scale_gate_up, act_scale_down) -> None:
    _expect_weight("w_gate_up", w_gate_up, (p.E, 2 * p.I, p.H), FP8_STORAGE)
    _expect_weight("w_down", w_down, (p.E, p.H, p.I), FP8_STORAGE)
    for name, scale, channels in (("w_gate_up_scale", w_gate_up_scale, 2 * p.I),
                                  ("w_down_scale", w_down_scale, p.H)):
        ok = scale is not None and tuple(scale.shape) in ((p.E,), (p.E, channels))
        _expect(ok, name, f"[{p.E}] (per tensor) or [{p.E}, {channels}] (per channel)", scale)
    for name, scale in (("act_scale_gate_up", act_scale_gate_up),
                        ("act_scale_down", act_scale_down)):
        _expect(scale is not None and scale.numel() in (1, p.E), name,
                f"one static scale ([] or [1]) or one per expert ([{p.E}])", scale)


def _check_int4(p: ExpertsProblem, hidden, w_gate_up, w_down, w_gate_up_scale, w_down_scale,
                *_act_scales) -> None:
    for name, w, scale, (N, K) in (("w_gate_up", w_gate_up, w_gate_up_scale, (2 * p.I, p.H)),
                                   ("w_down", w_down, w_down_scale, (p.H, p.I))):
        check_group_size(p.group_size, K)
        _expect_weight(name, w, (p.E, N, K // 2), (torch.uint8,))
        groups = math.ceil(K / p.group_size)
        _expect(scale is not None and tuple(scale.shape) == (p.E, N, groups)
                and scale.is_floating_point(), f"{name}_scale",
                f"[{p.E}, {N}, {groups}] float (group_size={p.group_size})", scale)


_CHECKS = {QuantScheme.NONE: _check_plain, QuantScheme.FP8: _check_fp8,
           QuantScheme.INT4: _check_int4}


def _expect_weight(name: str, w: Tensor, shape: tuple[int, ...], dtypes) -> None:
    names = " / ".join(str(d).removeprefix("torch.") for d in dtypes)
    _expect(tuple(w.shape) == shape and w.dtype in dtypes, name, f"{list(shape)} {names}", w)


def _expect(ok: bool, name: str, expected: str, tensor: Tensor | None) -> None:
    if ok:
        return
    found = "None" if tensor is None else \
        f"{list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
    raise UsageError(f"MoE expert input '{name}' does not match its layout", expected=expected,
                     found=found, hint="see mixbuild/plugins/formats.py for the layouts")
