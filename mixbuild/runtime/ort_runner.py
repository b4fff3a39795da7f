"""ONNX Runtime behind the Runner contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixbuild.contract import DType, is_kv_input
from mixbuild.errors import ArtifactError
from mixbuild.exporter.artifact import Artifact

CPU_KV_DTYPES = (DType.FP32, DType.FP16)   # what ONNX Runtime's CPU kernels run


class OrtRunner:
    name = "ort"

    def __init__(self, artifact: str | Path | Artifact, providers: list[str] | None = None,
                 threads: int | None = None, spinning: bool | None = None) -> None:
        """threads: intra-op threads (None: ONNX Runtime's default, one per physical core).
        spinning: whether idle intra-op threads busy-wait for work (None: ONNX Runtime's
        default, on); off is much faster when other thread pools (torch, a second session,
        other processes) share the cores."""
        import onnxruntime as ort

        self.artifact = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
        self.spec = self.artifact.spec
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        if spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
        try:
            self.session = ort.InferenceSession(str(self.artifact.onnx_path), options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"ONNX Runtime cannot load {self.artifact.onnx_path}",
                                found=str(exc).splitlines()[0][:300]) from exc
        dtype = DType.parse(self.artifact.manifest["dtype"])
        if dtype not in CPU_KV_DTYPES:
            raise ArtifactError(f"ONNX Runtime on CPU cannot run {self.artifact.manifest['dtype']} "
                                "artifacts", hint="export with --dtype fp32 or fp16 for ONNX Runtime CPU")
        self.kv_dtype = dtype.numpy
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fixed = {k: (v.astype(self.kv_dtype, copy=False) if is_kv_input(k) else v)
                 for k, v in feeds.items()}
        values = self.session.run(None, fixed)
        return dict(zip(self.output_names, values))
