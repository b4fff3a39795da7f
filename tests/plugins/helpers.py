"""Shared helpers of the plugin tests: routing, random experts, the triton skip marker."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mixbuild.model.ops import gate_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed (the 'dev' extra installs it)")


def routing(T: int, E: int, k: int, gen: torch.Generator, skip: tuple[int, ...] = ()):
    """Random top-k routing over E experts, never choosing those in `skip`: (weights, ids)."""
    logits = torch.randn(T, E, generator=gen)
    if skip:
        logits[:, list(skip)] = -1e4
    return gate_reference(logits, k, True)


def expert_weights(E: int, H: int, I: int, gen: torch.Generator, dtype=torch.float32):
    """Random w_gate_up [E, 2I, H] and w_down [E, H, I] scaled for unit-size outputs."""
    w_gate_up = torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5
    w_down = torch.randn(E, H, I, generator=gen) / I ** 0.5
    return w_gate_up.to(dtype), w_down.to(dtype)


def swiglu_amax(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    """max |silu(x W1^T) * (x W3^T)| over all tokens and experts (an fp8 calibration stand-in)."""
    gate, up = torch.einsum("th,enh->etn", x.float(), w_gate_up.float()).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).abs().amax()
