"""Reading an artifact's expert weights back, as the float values the graph computes with.

Used by the validator for per-expert errors. Reads the initializers' bytes straight from the
external data file (memory-mapped), one layer at a time, and dequantizes FP8 / INT4 experts with
mixbuild.plugins.formats. AWQ smoothing folded into the weights is undone with the scales the
quantizer saved (smoothing.safetensors), so the result is comparable with the checkpoint's
experts on the checkpoint's activations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixbuild.contract import SMOOTHING_FILE
from mixbuild.errors import ArtifactError
from mixbuild.exporter.artifact import Artifact
from mixbuild.tensors import initializer_array


class ArtifactWeights:
    def __init__(self, artifact: Artifact) -> None:
        import onnx

        self.artifact = artifact
        model = onnx.load(str(artifact.onnx_path), load_external_data=False)
        self.tensors = {t.name: t for t in model.graph.initializer}
        self.scheme = artifact.scheme
        self.group_size = artifact.manifest.group_size
        smoothing = artifact.path / SMOOTHING_FILE
        self.smoothing = {}
        if smoothing.is_file():
            from safetensors.numpy import load_file

            self.smoothing = load_file(str(smoothing))

    def array(self, name: str) -> np.ndarray:
        """One initializer as numpy (fp8 as uint8 bit patterns, int4 as packed bytes)."""
        tensor = self.tensors.get(name)
        if tensor is None:
            raise ArtifactError(f"artifact has no initializer '{name}'",
                                hint="the artifact was not made by this version of mixbuild")
        return initializer_array(tensor, self.artifact.path)

    def experts(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(w_gate_up [E, 2I, H], w_down [E, H, I]) float32, as the model computes with them."""
        import torch

        from mixbuild.plugins import formats

        base = f"layers.{layer}.moe."
        if not self.scheme.quantized:
            return (self.array(base + "w_gate_up").astype(np.float32),
                    self.array(base + "w_down").astype(np.float32))
        tensors = {n: torch.from_numpy(self.array(base + n)) for n in (
            "w_gate_up.quantized", "w_gate_up.scale", "w_down.quantized", "w_down.scale")}
        gate_up, down = formats.dequantize_experts(
            tensors["w_gate_up.quantized"], tensors["w_down.quantized"], self.scheme.moe,
            w_gate_up_scale=tensors["w_gate_up.scale"], w_down_scale=tensors["w_down.scale"],
            group_size=self.group_size)
        return self._unsmooth(layer, gate_up.numpy(), down.numpy())

    def _unsmooth(self, layer: int, gate_up: np.ndarray, down: np.ndarray):
        s_moe = self.smoothing.get(f"layers.{layer}.moe")
        s_down = self.smoothing.get(f"layers.{layer}.down")
        if s_moe is not None:
            gate_up = gate_up / s_moe
        if s_down is not None:
            half = gate_up.shape[1] // 2
            gate_up = gate_up.copy()
            gate_up[:, half:, :] *= s_down[:, :, None]
            down = down / s_down[:, None, :]
        return gate_up, down


def save_smoothing(calibration, directory: Path) -> None:
    """The AWQ scales folded into an artifact's weights (small), for reading them back."""
    from safetensors.torch import save_file

    tensors = {f"layers.{i}.{key}": value.float().contiguous()
               for i, c in enumerate(calibration) for key, value in c.smooth.items()}
    if tensors:
        save_file(tensors, str(directory / SMOOTHING_FILE))
