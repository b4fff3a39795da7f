"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's calibration inputs (H = X^T X). The output error on the calibration distribution
drops well below plain rounding; used for FP8 and INT4 weights (INT4 after AWQ smoothing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ColumnQuantizer = Callable[[Tensor, int, Tensor], Tensor]  # (column [N], k, W) -> dequantized column
# (W is the weight as updated so far; a quantizer reads only the columns it needs from it)


def hessian(x: Tensor, routed: Tensor | None = None, routed_weight: float = 0.9) -> Tensor:
    """H [K, K] from inputs x [T, K]; with `routed` (the rows a MoE expert really sees), a mix
    that favours those rows but keeps every direction of x (an expert may see few tokens)."""
    x = x.double()
    h = x.T @ x / max(x.shape[0], 1)
    if routed is not None and routed.shape[0] > 0:
        r = routed.double()
        h = (1 - routed_weight) * h + routed_weight * (r.T @ r / r.shape[0])
    return h


def gptq(w: Tensor, h: Tensor, quantize_column: ColumnQuantizer, damp: float = 0.01,
         block: int = 128) -> Tensor:
    """Dequantized GPTQ result of W [N, K] for Hessian H [K, K] (float32 [N, K])."""
    w = w.double().clone()
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.zeros_like(w)
    k_total = w.shape[1]
    for start in range(0, k_total, block):
        end = min(start + block, k_total)
        errors = torch.zeros(w.shape[0], end - start, dtype=w.dtype)
        for k in range(start, end):
            col = w[:, k]
            q = quantize_column(col.float(), k, w).double()   # w: the updated float64 W
            out[:, k] = q
            err = (col - q) / hinv[k, k]
            w[:, k + 1:end] -= err[:, None] * hinv[k, k + 1:end][None, :]
            errors[:, k - start] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    return out.float()
