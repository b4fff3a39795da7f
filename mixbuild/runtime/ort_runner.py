"""ONNX Runtime behind the Runner contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixbuild.contract import DType, Layout, is_kv_input
from mixbuild.errors import ArtifactError
from mixbuild.exporter.artifact import Artifact

CPU_KV_DTYPES = (DType.FP32, DType.FP16)   # what ONNX Runtime's CPU kernels run


class OrtRunner:
    name = "ort"

    def __init__(self, artifact: str | Path | Artifact, providers: list[str] | None = None,
                 threads: int | None = None, spinning: bool | None = None,
                 fast_attention: bool = True) -> None:
        """threads: intra-op threads (None: ONNX Runtime's default, one per physical core).
        spinning: whether idle intra-op threads busy-wait for work (None: ONNX Runtime's
        default, on); off is much faster when other thread pools (torch, a second session,
        other processes) share the cores. fast_attention: on a serving-layout artifact, run
        its attention as ONNX Runtime's GroupQueryAttention (mixbuild/runtime/ort_attention.py:
        it reads only the valid cache positions); False runs the artifact's graph as it is."""
        import onnxruntime as ort

        self.artifact = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
        self.spec = self.artifact.spec
        providers = providers or ["CPUExecutionProvider"]
        dtype = DType.parse(self.artifact.manifest["dtype"])
        if dtype not in CPU_KV_DTYPES and providers == ["CPUExecutionProvider"]:
            # before the session: ONNX Runtime's own refusal would only name a missing kernel
            raise ArtifactError(
                f"ONNX Runtime on the CPU cannot run {dtype.value} artifacts: "
                f"{self.artifact.path} was exported with --dtype {dtype.short}",
                expected=f"an artifact exported with --dtype {' or '.join(d.short for d in CPU_KV_DTYPES)}"
                         " for ONNX Runtime on the CPU",
                found=f"dtype {dtype.value} ({self.artifact.manifest.get('precision')})",
                hint="re-export with `mixbuild export ... --dtype fp32` (or fp16) to run on the "
                     "CPU; or run this artifact on a GPU: build a TensorRT engine with `mixbuild "
                     "engine` (BF16 needs compute capability 8.0+), or use ONNX Runtime's CUDA "
                     "provider (`mixbuild run --device cuda`)")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        if spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
        model, self.fast_attention = str(self.artifact.onnx_path), 0
        if fast_attention and self.artifact.manifest.get("layout") == Layout.SERVING.value:
            from mixbuild.runtime.ort_attention import fast_session_model

            model, self.fast_attention = fast_session_model(
                self.artifact.onnx_path, self.spec.num_heads, self.spec.num_kv_heads,
                self.spec.sliding_window)
            # the rewritten graph is in memory: its external data stays in the artifact
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(self.artifact.path))
        try:
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"ONNX Runtime cannot load {self.artifact.onnx_path}",
                                found=str(exc).splitlines()[0][:300]) from exc
        self.kv_dtype = dtype.numpy
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fixed = {k: (v.astype(self.kv_dtype, copy=False) if is_kv_input(k) else v)
                 for k, v in feeds.items()}
        values = self.session.run(None, fixed)
        return dict(zip(self.output_names, values))
