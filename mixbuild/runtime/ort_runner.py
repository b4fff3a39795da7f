"""ONNX Runtime behind the Runner contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixbuild.errors import ArtifactError
from mixbuild.exporter.artifact import Artifact

_NP = {"float32": np.float32, "float16": np.float16}


class OrtRunner:
    name = "ort"

    def __init__(self, artifact: str | Path | Artifact, providers: list[str] | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.artifact = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
        self.spec = self.artifact.spec
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.artifact.onnx_path), options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"ONNX Runtime cannot load {self.artifact.onnx_path}",
                                found=str(exc).splitlines()[0][:300]) from None
        self.kv_dtype = _NP.get(self.artifact.manifest["dtype"])
        if self.kv_dtype is None:
            raise ArtifactError(f"ONNX Runtime on CPU cannot run {self.artifact.manifest['dtype']} "
                                "artifacts", hint="export with --dtype fp32 or fp16 for ONNX Runtime CPU")
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fixed = {k: (v.astype(self.kv_dtype, copy=False) if k.startswith("past_") else v)
                 for k, v in feeds.items()}
        values = self.session.run(None, fixed)
        return dict(zip(self.output_names, values))
