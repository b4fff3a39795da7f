"""Weight quantizers on [N, K] matrices and AWQ's activation-aware scale search.

AWQ (Lin et al., 2023): scaling input channel k of a weight by s_k before quantization, and the
activation by 1/s_k, leaves the float product unchanged but lowers the quantization error of
the channels that carry large activations. The search tries s = mean|x|^alpha for alpha on a
grid and keeps the one with the smallest output error on calibration activations. The 1/s is
folded into the op that produces x (an RMSNorm weight, or the rows of the previous linear), so
the quantized graph has no extra op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mixbuild.plugins import formats

Quantizer = Callable[[Tensor], Tensor]   # W [N, K] -> dequantized W [N, K] (float32)


def int4_fake_quant(group_size: int) -> Quantizer:
    def fake(w: Tensor) -> Tensor:
        packed, scale = formats.quantize_int4(w[None].float(), group_size, torch.float32)
        return formats.dequantize_int4(packed, scale, group_size)[0]
    return fake


def fp8_fake_quant(per_channel: bool) -> Quantizer:
    def fake(w: Tensor) -> Tensor:
        q, scale = formats.quantize_fp8(w[None].float(), per_channel=per_channel)
        return formats.dequantize_fp8(q, scale)[0]
    return fake


def relative_error(w: Tensor, approx: Tensor) -> float:
    w = w.float()
    norm = w.norm()
    return float((w - approx).norm() / norm) if norm > 0 else 0.0


def _candidate_scales(x_mean: Tensor, alpha: float) -> Tensor:
    s = x_mean.clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def search_scales(x: Tensor, weights: list[Tensor], quantize: Quantizer, grid: int = 20,
                  max_tokens: int = 1024) -> tuple[Tensor, float]:
    """Best per-input-channel scales s [K] for weights sharing the input x [T, K].

    Returns (s, alpha). The loss is the summed mean squared error of x @ W.T against
    (x / s) @ Q(W * s).T over all weights; alpha = 0 (s = 1) is plain round-to-nearest, so the
    result is never worse than RTN on the calibration data.
    """
    x = x.float()
    if x.shape[0] > max_tokens:
        x = x[torch.linspace(0, x.shape[0] - 1, max_tokens).long()]
    x_mean = x.abs().mean(dim=0)
    refs = [x @ w.float().T for w in weights]
    best = (float("inf"), torch.ones_like(x_mean), 0.0)
    for step in range(grid + 1):
        alpha = step / grid
        s = _candidate_scales(x_mean, alpha)
        xs = x / s
        loss = sum(float(((xs @ quantize(w.float() * s).T) - ref).pow(2).mean())
                   for w, ref in zip(weights, refs))
        if loss < best[0]:
            best = (loss, s, alpha)
    return best[1], best[2]
