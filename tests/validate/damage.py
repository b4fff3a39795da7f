"""Damaged copies of artifacts: one initializer's bytes edited inside a copy of the external
data, the manifest re-hashed, so the artifact opens as valid but computes something else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx

from mixbuild.exporter.manifest import write_manifest

_NUMPY = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
          onnx.TensorProto.FLOAT8E4M3FN: np.uint8, onnx.TensorProto.INT4: np.uint8}


def edit_initializer(artifact: Path, dst: Path, name: str, edit) -> Path:
    """Copy `artifact` to `dst` and replace initializer `name` by edit(array) (fp8 as uint8
    bytes, int4 as packed bytes [..., K/2]); returns dst."""
    if not dst.exists():
        shutil.copytree(artifact, dst)
    model = onnx.load(str(dst / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == name)
    info = {e.key: e.value for e in tensor.external_data}
    dims = list(tensor.dims)
    if tensor.data_type == onnx.TensorProto.INT4:
        dims[-1] //= 2
    data = np.memmap(dst / info["location"], dtype=_NUMPY[tensor.data_type], mode="r+",
                     offset=int(info.get("offset", 0)), shape=tuple(dims))
    data[...] = edit(np.array(data))
    data.flush()
    del data
    manifest = json.loads((dst / "mixbuild.json").read_text())
    manifest.pop("files")
    write_manifest(dst, manifest)
    return dst


def scale_expert(artifact: Path, dst: Path, layer: int, expert: int, factor: float = 4.0) -> Path:
    """One expert's fp8 weight scales (its gate/up rows) multiplied by `factor`."""
    def edit(scale):
        scale[expert] *= factor
        return scale
    return edit_initializer(artifact, dst, f"layers.{layer}.moe.w_gate_up.scale", edit)


def shuffle_group_scales(artifact: Path, dst: Path, layer: int, seed: int = 0) -> Path:
    """One layer's int4 expert group scales (gate/up and down) permuted at random."""
    rng = np.random.default_rng(seed)
    for part in ("w_gate_up", "w_down"):
        edit_initializer(artifact, dst, f"layers.{layer}.moe.{part}.scale",
                         lambda s: rng.permutation(s.reshape(-1)).reshape(s.shape))
    return dst


def zero_attention(artifact: Path, dst: Path, layer: int, projection: str = "o_proj") -> Path:
    """One attention projection of one layer zeroed (its weight codes or values)."""
    names = [t.name for t in onnx.load(str(artifact / "model.onnx"),
                                       load_external_data=False).graph.initializer]
    base = f"layers.{layer}.attn.{projection}.weight"
    name = base + ".quantized" if base + ".quantized" in names else base
    return edit_initializer(artifact, dst, name, np.zeros_like)
