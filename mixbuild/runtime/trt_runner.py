"""A TensorRT (or TensorRT-RTX) engine behind the Runner contract.

Deliberately thin, and unverified on hardware: no machine mixbuild is developed on has a GPU
with TensorRT, so this is written against the TensorRT 10 / TensorRT-RTX Python API
(deserialize_cuda_engine, set_input_shape, set_tensor_address, execute_async_v3) and tested
only for its dependency and manifest errors. Buffers are torch CUDA tensors; feeds and outputs
are host numpy arrays as the Runner contract says, so every call copies in and out (a
device-resident KV cache is future work). One execution context serves every call, behind a
lock.

An engine directory holds ``engine.plan`` and ``engine.json`` (written by `mixbuild engine`,
read with mixbuild.builder.manifest): this runner uses its ``spec``, ``backend`` (the
contract's EngineBackend: "tensorrt" or "tensorrt-rtx"), ``plugin_registration`` (MoE plugins
registered before deserializing when the engine has them) and ``profiles`` (the tightest
optimisation profile that holds each call's shapes is selected). Tensor names are the ONNX contract's.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from mixbuild.contract import PLAN_FILE, EngineBackend, input_names, output_names
from mixbuild.errors import ArtifactError, UsageError
from mixbuild.model.spec import MixtralSpec


class TrtRunner:
    name = "trt"

    def __init__(self, directory: str | Path) -> None:
        from mixbuild.builder.manifest import read_engine_manifest, verify_plan
        from mixbuild.plugins.trt_plugins import register_plugins, trt_module

        directory = Path(directory)
        self.manifest = read_engine_manifest(directory)   # every field and its type checked
        self.spec = MixtralSpec.from_dict(self.manifest["spec"])
        self.profiles = self.manifest["profiles"]
        backend = EngineBackend.parse(self.manifest["backend"])
        self.trt = trt = trt_module(backend)  # MissingDependencyError names the extra
        import torch

        if not torch.cuda.is_available():
            raise UsageError("the trt backend needs a CUDA GPU, and torch sees none",
                             hint="run the artifact with the ort backend on this machine")
        plan = verify_plan(directory, self.manifest)   # never deserialize a changed plan
        if self.manifest["plugin_registration"]:
            register_plugins(backend)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {directory / PLAN_FILE}",
                                hint="rebuild the engine with this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.lock = threading.Lock()
        self._inputs, self._outputs = input_names(self.spec.num_layers), output_names(self.spec.num_layers)
        self.kv_dtype = self._numpy_dtype(self._inputs[3])

    def _torch_dtype(self, name: str):
        from mixbuild.plugins.trt_fields import torch_dtype

        return torch_dtype(self.trt, self.engine.get_tensor_dtype(name))

    def _numpy_dtype(self, name: str):
        import torch

        return torch.empty(0, dtype=self._torch_dtype(name)).numpy().dtype

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from mixbuild.tensors import to_numpy

        with self.lock, torch.cuda.stream(self.stream):
            self._select_profile(feeds)
            keep = [self._bind_input(name, feeds[name]) for name in self._inputs]
            outputs = {name: self._bind_output(name) for name in self._outputs}
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise ArtifactError("TensorRT failed to execute the engine",
                                    hint="run with a TensorRT logger at VERBOSE for details")
            self.stream.synchronize()
            del keep
            return {name: to_numpy(t) for name, t in outputs.items()}

    def _select_profile(self, feeds: dict[str, np.ndarray]) -> None:
        if len(self.profiles) < 2:
            return
        from mixbuild.builder.profiles import select_profile

        index = select_profile(self.profiles, {n: feeds[n].shape for n in self._inputs})
        if index != self.context.active_optimization_profile:
            self.context.set_optimization_profile_async(index, self.stream.cuda_stream)

    def _bind_input(self, name: str, array: np.ndarray):
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(
            device="cuda", dtype=self._torch_dtype(name), non_blocking=True)
        self.context.set_input_shape(name, tuple(tensor.shape))
        if tensor.numel() == 0:  # an empty past still needs a valid address
            tensor = torch.empty(1, dtype=tensor.dtype, device="cuda")
        self.context.set_tensor_address(name, tensor.data_ptr())
        return tensor

    def _bind_output(self, name: str):
        import torch

        shape = tuple(self.context.get_tensor_shape(name))
        tensor = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
        self.context.set_tensor_address(name, tensor.data_ptr())
        return tensor
