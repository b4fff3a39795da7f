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
                 fast_attention: bool = True, fast_quantized: bool = True,
                 accuracy_level: int = 1, graph_rewrite=None) -> None:
        """threads: intra-op threads (None: ONNX Runtime's default, one per physical core).
        spinning: whether idle intra-op threads busy-wait for work (None: ONNX Runtime's
        default, on); off is much faster when other thread pools (torch, a second session,
        other processes) share the cores. fast_attention: on a serving-layout artifact, run
        its attention as ONNX Runtime's GroupQueryAttention (mixbuild/runtime/ort_attention.py:
        it reads only the valid cache positions); False runs the artifact's graph as it is.
        fast_quantized: run int4 experts as ONNX Runtime's QMoE, fold fp8 weights to float32
        at load (mixbuild/schemes/ort.py);
        accuracy_level: the int4 kernels' (MatMulNBits, QMoE) activation precision: 1 float32
        (the contract's W4A16, the default), 4 int8 (faster, other numerics). `kernels` records
        what the session runs instead of the artifact's own bodies.
        graph_rewrite: a callable given the in-memory copy of the graph (an onnx ModelProto
        without its external data) before the runtime's own rewrites, e.g. to add graph
        outputs on existing values (the validator's diagnostics); the files are never changed."""
        import onnxruntime as ort

        self.artifact = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
        self._fast_quantized = fast_quantized
        self._graph_rewrite = graph_rewrite
        self.spec = self.artifact.spec
        providers = providers or ["CPUExecutionProvider"]
        self._on_cpu = providers[0] == "CPUExecutionProvider"
        dtype = self.artifact.dtype
        if dtype not in CPU_KV_DTYPES and providers == ["CPUExecutionProvider"]:
            # before the session: ONNX Runtime's own refusal would only name a missing kernel
            raise ArtifactError(
                f"ONNX Runtime on the CPU cannot run {dtype.value} artifacts: "
                f"{self.artifact.path} was exported with --dtype {dtype.short}",
                expected=f"an artifact exported with --dtype {' or '.join(d.short for d in CPU_KV_DTYPES)}"
                         " for ONNX Runtime on the CPU",
                found=f"dtype {dtype.value} ({self.artifact.precision.value})",
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
        model, self.kernels = self._session_model(options, fast_attention, accuracy_level)
        try:
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"ONNX Runtime cannot load {self.artifact.onnx_path}",
                                found=str(exc).splitlines()[0][:300]) from exc
        self.kv_dtype = dtype.numpy
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _session_model(self, options, fast_attention: bool, accuracy_level: int):
        """The model ONNX Runtime loads: the artifact's file, or a rewritten in-memory copy
        (its external data stays in the artifact; new initializers go in as OrtValues)."""
        artifact = self.artifact
        serving = artifact.layout is Layout.SERVING
        scheme = artifact.scheme
        kernels = {"attention": "artifact", "experts": "artifact"}
        self.fast_attention = 0
        entries, chosen = scheme.ort_session(accuracy_level, self._fast_quantized)
        for key, value in entries.items():
            options.add_session_config_entry(key, value)
        kernels.update(chosen)
        quantized = scheme.ort_rewrites(self._fast_quantized)
        rewrite = self._graph_rewrite
        if not (fast_attention and serving) and not quantized and rewrite is None:
            return str(self.artifact.onnx_path), kernels
        import onnx

        model = onnx.load(str(self.artifact.onnx_path), load_external_data=False)
        if rewrite is not None:
            rewrite(model)
        if fast_attention and serving:
            from mixbuild.runtime.ort_attention import rewrite_attention

            self.fast_attention = rewrite_attention(model, self.spec.num_heads, self.spec.num_kv_heads,
                                                    self.spec.sliding_window)
            kernels["attention"] = f"GroupQueryAttention x{self.fast_attention}"
        if quantized:
            done, chosen = scheme.ort_rewrite(model, self.artifact.path, artifact.dtype.numpy,
                                              accuracy_level, artifact.head_scheme, self._on_cpu)
            if done.initializers:
                import onnxruntime as ort

                self._initializers = {k: ort.OrtValue.ortvalue_from_numpy(v)
                                      for k, v in done.initializers.items()}
                self._arrays = done.initializers       # the OrtValues borrow these buffers
                options.add_external_initializers(list(self._initializers),
                                                  list(self._initializers.values()))
            kernels.update(chosen)
            kernels["notes"] = done.notes
        # the rewritten graph is in memory: its external data stays in the artifact
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(self.artifact.path))
        return model.SerializeToString(), kernels

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fixed = {k: (v.astype(self.kv_dtype, copy=False) if is_kv_input(k) else v)
                 for k, v in feeds.items()}
        values = self.session.run(None, fixed)
        return dict(zip(self.output_names, values))
