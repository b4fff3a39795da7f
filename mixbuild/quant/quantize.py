"""Quantize one decoder layer's weights (AWQ-smoothed, GPTQ-rounded) into a disk store.

Calibration calls `quantize_layer` while that layer's activations are at hand, writes the
quantized tensors of the layer to `QuantStore` (one safetensors file per layer) and drops
them; the graph rewrite later streams them into the artifact. Layouts are those of
mixbuild.plugins.formats, with linears as one-expert [1, N, K] tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from mixbuild.contract import Precision
from mixbuild.model.reference import weight_sources
from mixbuild.plugins import formats
from mixbuild.quant import gptq as G
from mixbuild.quant.config import QuantConfig

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


class SmoothedWeights:
    """Checkpoint weights (float32) with the AWQ scales folded in, loaded one at a time."""

    def __init__(self, ckpt, calibration) -> None:
        self.loaders = dict(weight_sources(ckpt))
        self.calibration = calibration  # list of LayerCalibration, possibly still growing
        self.intermediate = ckpt.spec.intermediate_size

    def smoothing(self, layer: int) -> dict[str, Tensor]:
        return self.calibration[layer].smooth if layer < len(self.calibration) else {}

    def names(self):
        return self.loaders.keys()

    def __call__(self, name: str) -> torch.Tensor:
        w = self.loaders[name]().float()
        match = _LAYER.fullmatch(name)
        if match is None:
            return w
        return self._fold(w, match[2], self.smoothing(int(match[1])))

    def _fold(self, w: torch.Tensor, part: str, s: dict[str, torch.Tensor]) -> torch.Tensor:
        rules: dict[str, list[tuple[str, Callable]]] = {
            "input_norm.weight": [("attn", lambda w, s: w / s)],
            "attn.q_proj.weight": [("attn", lambda w, s: w * s)],
            "attn.k_proj.weight": [("attn", lambda w, s: w * s)],
            "attn.v_proj.weight": [("attn", lambda w, s: w * s), ("o", lambda w, s: w / s[:, None])],
            "attn.o_proj.weight": [("o", lambda w, s: w * s)],
            "post_norm.weight": [("moe", lambda w, s: w / s)],
            "moe.gate.weight": [("moe", lambda w, s: w * s)],
            "moe.w_gate_up": [("moe", lambda w, s: w * s), ("down", self._fold_down_into_up)],
            "moe.w_down": [("down", lambda w, s: w * s[:, None, :])],
        }
        for key, fold in rules.get(part, []):
            if key in s:
                w = fold(w, s[key])
        return w

    def _fold_down_into_up(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        w = w.clone()
        w[:, self.intermediate:, :] /= s[:, :, None]  # the up rows produce w_down's input
        return w




HEAD = "head"   # the QuantStore part of the tensors outside the decoder layers (lm_head)


class QuantStore:
    """Quantized weights on disk: `layers.{i}.{param}` -> (q, scale), one file per layer, and
    `lm_head.weight` in the HEAD part."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._open: dict[int | str, object] = {}
        self.head_error: float | None = None   # lm_head's relative weight error, when quantized

    def save(self, part: int | str, tensors: dict[str, tuple[Tensor, Tensor]]) -> None:
        """part: a layer index, or HEAD."""
        from safetensors.torch import save_file

        flat = {}
        for name, (q, scale) in tensors.items():
            flat[f"{name}.q"], flat[f"{name}.scale"] = q.contiguous(), scale.contiguous()
        save_file(flat, str(self.directory / f"layer_{part}.safetensors"))

    def get(self, name: str) -> tuple[Tensor, Tensor]:
        from safetensors import safe_open

        match = _LAYER.fullmatch(name)
        part = int(match[1]) if match else HEAD
        if part not in self._open:
            self._open[part] = safe_open(str(self.directory / f"layer_{part}.safetensors"), "pt")
        fh = self._open[part]
        return fh.get_tensor(f"{name}.q"), fh.get_tensor(f"{name}.scale")


class _Fp8Columns:
    """GPTQ column quantizer for FP8 with scales fixed from the smoothed weight's amax."""

    def __init__(self, w: Tensor, per_channel: bool) -> None:
        amax = w.abs().amax(dim=-1) if per_channel else w.abs().amax().expand(w.shape[0])
        self.scale = torch.where(amax > 0, amax / formats.FP8_MAX, torch.ones_like(amax))

    def __call__(self, col: Tensor, k: int, w: Tensor) -> Tensor:
        return formats.fp8_round(col / self.scale).float() * self.scale

    def encode(self, wq: Tensor, per_channel: bool) -> tuple[Tensor, Tensor]:
        q = formats.fp8_round(wq / self.scale[:, None])
        return q, self.scale if per_channel else self.scale[:1].reshape(())


INT4_SCALE_DIVISOR = 7.5   # amax / 7.5, codes in [-8, 7]: compressed-tensors' symmetric int4


class _IntColumns:
    """GPTQ column quantizer for grouped symmetric INT4 (or INT8, bits=8: lm_head). The group
    scales are static: computed from the (smoothed) weight before GPTQ starts, so that the
    columns can be visited in any order (`order`: the visiting position -> the column; GPTQ's
    act order, most active input channels first, as llm-compressor's "static" act order)."""

    def __init__(self, w: Tensor, group: int, bits: int = 4, order: Tensor | None = None) -> None:
        self.group, self.bits, self.order = group, bits, order
        self.low, self.high = ((formats.INT4_MIN, formats.INT4_MAX) if bits == 4
                               else (-formats.INT8_MAX, formats.INT8_MAX))
        divisor = INT4_SCALE_DIVISOR if bits == 4 else formats.INT8_MAX
        amax = torch.stack([g.abs().amax(dim=-1) for g in w.split(group, dim=-1)], dim=-1)
        scale = torch.where(amax > 0, amax / divisor, torch.ones_like(amax))
        self.scales = scale.half().float()            # stored in fp16: round with it [N, groups]

    def __call__(self, col: Tensor, k: int, w: Tensor) -> Tensor:
        column = int(self.order[k]) if self.order is not None else k
        scale = self.scales[:, column // self.group]
        return torch.round(col / scale).clamp(self.low, self.high) * scale

    def encode(self, wq: Tensor) -> tuple[Tensor, Tensor]:
        """(codes, scale [N, groups] fp16) of wq (original column order): int4 packed two per
        byte [N, K/2], int8 [N, K]."""
        full = self.scales.repeat_interleave(self.group, dim=-1)[:, :wq.shape[1]]
        codes = torch.round(wq / full).clamp(self.low, self.high)
        packed = formats.pack_int4(codes) if self.bits == 4 else codes.to(torch.int8)
        return packed, self.scales.half()


def quantize_matrix(w: Tensor, x: Tensor | None, routed: Tensor | None, config: QuantConfig,
                    bits: int = 4):
    """W [N, K] (already smoothed) -> (q, scale) in formats layout for one expert, plus the
    dequantized weight. x: the calibration inputs [T, K] for GPTQ (None: round to nearest).
    bits: the int width (8 for an int8 lm_head) when the precision is int4."""
    w = w.float()
    fp8 = config.precision is Precision.FP8

    def columns(order):
        return (_Fp8Columns(w, config.fp8_per_channel) if fp8
                else _IntColumns(w, config.group_size, bits, order))
    if config.gptq and x is not None:
        # act order: the most active input channels first (the scales do not depend on order)
        h = G.hessian(x, routed, config.routed_weight)
        order = torch.argsort(torch.diag(h), descending=True)
        cols = columns(order)
        wq = G.gptq(w[:, order], h[order][:, order], cols)[:, torch.argsort(order)]
    else:
        cols = columns(None)
        wq = torch.stack([cols(w[:, k], k, w) for k in range(w.shape[1])], dim=1)
    q, scale = cols.encode(wq, config.fp8_per_channel) if fp8 else cols.encode(wq)
    return q, scale, wq
