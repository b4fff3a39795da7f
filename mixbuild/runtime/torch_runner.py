"""The mixbuild reference model behind the Runner contract."""

from __future__ import annotations

import numpy as np
import torch

from mixbuild.model.reference import MixtralModel
from mixbuild.runtime.runner import debug_output_names, input_names, output_names


class TorchRunner:
    name = "torch"

    def __init__(self, model: MixtralModel) -> None:
        self.model = model
        self.spec = model.spec
        self._inputs = input_names(self.spec)
        self._outputs = output_names(self.spec) + (debug_output_names(self.spec) if model.debug else [])

    @classmethod
    def from_checkpoint(cls, path, dtype=torch.float32, debug: bool = False) -> "TorchRunner":
        return cls(MixtralModel.from_checkpoint(path, dtype=dtype, debug=debug))

    @torch.inference_mode()
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dtype = self.model.lm_head.weight.dtype
        args = []
        for name in self._inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name]))
            args.append(t.to(dtype) if name.startswith("past_") else t)
        outs = self.model(*args)
        return {n: _to_numpy(t) for n, t in zip(self._outputs, outs)}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
