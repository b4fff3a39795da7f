"""The mixbuild reference model behind the Runner contract."""

from __future__ import annotations

import numpy as np
import torch

from mixbuild.contract import Layout, debug_output_names, input_names, is_kv_input, output_names
from mixbuild.model.reference import MixtralModel, model_class
from mixbuild.tensors import to_numpy


class TorchRunner:
    """Feeds and outputs are host numpy arrays; on a GPU the model runs on its device (its MoE
    through the Triton kernels unless MIXBUILD_DISABLE_TRITON=1) and the arrays are copied in
    and out each call. The GPU path is written but unverified: no GPU was available to test it."""

    name = "torch"

    def __init__(self, model: MixtralModel) -> None:
        self.model = model
        self.spec = model.spec
        self.device = model.lm_head.weight.device
        self._inputs = input_names(self.spec.num_layers)
        self._outputs = output_names(self.spec.num_layers) + (
            debug_output_names(self.spec.num_layers) if model.debug else [])

    @classmethod
    def from_checkpoint(cls, path, dtype: torch.dtype | None = torch.float32, debug: bool = False,
                        device: str = "cpu") -> TorchRunner:
        """dtype None keeps the checkpoint's own dtype."""
        return cls(cls.load_model(path, dtype, device, debug=debug))

    @staticmethod
    def load_model(path, dtype: torch.dtype | None, device: str, debug: bool = False,
                   layout: Layout = Layout.CONCAT) -> MixtralModel:
        """The reference model of `layout` on `device` (its MoE through the Triton kernels on
        CUDA); dtype None keeps the checkpoint's own."""
        if str(device).startswith("cuda"):
            from mixbuild.plugins.dispatch import register_cuda_kernels

            register_cuda_kernels()  # the MoE custom ops run mixbuild's Triton kernels on CUDA
        if dtype is None:
            from mixbuild.model.checkpoint import Checkpoint

            dtype = Checkpoint(path).spec.dtype.torch
        return model_class(layout).from_checkpoint(path, dtype=dtype, device=device, debug=debug)

    @torch.inference_mode()
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dtype = self.model.lm_head.weight.dtype
        args = []
        for name in self._inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device)
            args.append(t.to(dtype) if is_kv_input(name) else t)
        outs = self.model(*args)
        return {n: to_numpy(t) for n, t in zip(self._outputs, outs)}

