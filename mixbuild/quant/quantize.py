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

from mixbuild.model.reference import weight_sources
from mixbuild.quant import gptq as G
from mixbuild.quant.config import QuantConfig
from mixbuild.schemes import Scheme

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


def quantize_matrix(w: Tensor, x: Tensor | None, routed: Tensor | None, config: QuantConfig,
                    scheme: Scheme | None = None):
    """W [N, K] (already smoothed) -> (q, scale) in formats layout for one expert, plus the
    dequantized weight. x: the calibration inputs [T, K] for GPTQ (None: round to nearest).
    scheme: the weights' format (default: the config's; lm_head passes its own)."""
    w = w.float()
    scheme = scheme or config.scheme
    if config.gptq and x is not None:
        # act order: the most active input channels first (the scales do not depend on order)
        h = G.hessian(x, routed, config.routed_weight)
        order = torch.argsort(torch.diag(h), descending=True)
        cols = scheme.columns(w, config, order)
        wq = G.gptq(w[:, order], h[order][:, order], cols)[:, torch.argsort(order)]
    else:
        cols = scheme.columns(w, config)
        wq = torch.stack([cols(w[:, k], k, w) for k in range(w.shape[1])], dim=1)
    q, scale = cols.encode(wq)
    return q, scale, wq
