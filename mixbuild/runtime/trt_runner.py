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

from mixbuild.contract import (
    PLAN_FILE,
    SERVING_INPUTS,
    Layout,
    cache_pairs,
    input_names,
    output_names,
)
from mixbuild.errors import ArtifactError, UsageError


class TrtRunner:
    name = "trt"

    def __init__(self, directory: str | Path) -> None:
        from mixbuild.builder.manifest import read_engine_manifest, verify_plan
        from mixbuild.plugins.trt_plugins import register_plugins, trt_module

        directory = Path(directory)
        self.manifest = read_engine_manifest(directory)   # every field and its type checked
        self.spec = self.manifest.spec
        self.profiles = self.manifest.profiles
        backend = self.manifest.backend
        self.trt = trt = trt_module(backend)  # MissingDependencyError names the extra
        import torch

        if not torch.cuda.is_available():
            raise UsageError("the trt backend needs a CUDA GPU, and torch sees none",
                             hint="run the artifact with the ort backend on this machine")
        plan = verify_plan(directory, self.manifest)   # never deserialize a changed plan
        if self.manifest.plugin_registration:
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
        if self.manifest.layout is Layout.SERVING:   # TrtServingStep binds these
            self._inputs = [*SERVING_INPUTS, *(k for k, _ in cache_pairs(self.spec.num_layers))]
        self.kv_dtype = self._numpy_dtype(self._inputs[-1])

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
        self._select_shapes({n: feeds[n].shape for n in self._inputs})

    def _select_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        if len(self.profiles) < 2:
            return
        from mixbuild.builder.profiles import select_profile

        index = select_profile(self.profiles, shapes)
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


class TrtServingStep:
    """A serving-layout engine (engine.json "layout": "serving") with the serving step contract
    (`run`, as ServingStep / TorchServingStep), for the continuous-batching scheduler.

    The KV cache is one TorchStaticCache on the GPU, [max_batch, Nkv, C, D] per layer and per
    key/value, C the engine's fixed `cache_capacity`: each layer's cache input and its updated
    output are bound to the SAME address, rows 0..B-1 of the buffer, so the engine's
    KV-cache-update layer writes in place and nothing is copied per step. Only the token
    inputs go host -> device and the last-token logits [B, V] device -> host.

    Unverified: written against the TensorRT 10 / TensorRT-RTX Python API
    (set_input_shape, set_tensor_address, execute_async_v3); no machine mixbuild is developed
    on has a GPU with TensorRT."""

    layout = Layout.SERVING

    def __init__(self, runner: TrtRunner, max_batch: int) -> None:
        from mixbuild.contract import cache_pairs

        manifest = runner.manifest
        if manifest.layout is not Layout.SERVING:
            raise ArtifactError("the engine was not built from a serving-layout artifact",
                                expected='engine.json with "layout": "serving" and a cache_capacity',
                                found=f"layout {manifest.layout.value!r}",
                                hint="export with `mixbuild export --layout serving` and build again")
        self.runner, self.spec = runner, runner.spec
        limits = manifest.limits
        if max_batch > limits["max_batch"]:
            raise UsageError("max_batch is larger than the engine's", expected=f"<= {limits['max_batch']}",
                             found=str(max_batch), hint="load with a smaller max_batch, or rebuild")
        self.capacity = manifest.cache_capacity
        self.max_batch = max_batch
        self.max_step_tokens = int(limits["max_step_tokens"])
        self.names = cache_pairs(self.spec.num_layers)
        self.dtype = runner._torch_dtype(self.names[0][0])
        self.device = "cuda"

    def new_cache(self, capacity: int | None = None, max_batch: int | None = None):
        """The engine's capacity is fixed at build time: `capacity` larger than it is refused
        by the caller's limits (Model.context_limit follows `self.capacity`)."""
        from mixbuild.runtime.kv_cache import TorchStaticCache

        return TorchStaticCache(self.spec, self.capacity, max_batch or self.max_batch, self.dtype,
                                self.device)

    def run(self, ids: np.ndarray, positions: np.ndarray, counts: np.ndarray, cache) -> np.ndarray:
        import torch

        from mixbuild.contract import CACHE_LENGTHS, INPUT_IDS, INPUT_LENGTHS, LOGITS, POSITION_IDS
        from mixbuild.tensors import to_numpy

        batch, seq = ids.shape
        cache.check_room(batch, seq)
        runner, context = self.runner, self.runner.context
        feeds = {INPUT_IDS: ids, POSITION_IDS: positions, CACHE_LENGTHS: cache.lengths[:batch],
                 INPUT_LENGTHS: counts}
        with runner.lock, torch.cuda.stream(runner.stream):
            shapes = {name: a.shape for name, a in feeds.items()}
            shapes.update({name: (batch, *cache.buffers[0].shape[1:]) for name, _ in self.names})
            runner._select_shapes(shapes)
            keep = [runner._bind_input(name, np.ascontiguousarray(a, np.int64))
                    for name, a in feeds.items()]
            for (name, updated), buffer in zip(self.names, cache.buffers):
                rows = buffer[:batch]                      # contiguous: rows are the outer dim
                context.set_input_shape(name, tuple(rows.shape))
                context.set_tensor_address(name, rows.data_ptr())
                context.set_tensor_address(updated, rows.data_ptr())   # in place
            logits = runner._bind_output(LOGITS)
            if not context.execute_async_v3(runner.stream.cuda_stream):
                raise ArtifactError("TensorRT failed to execute the engine",
                                    hint="run with a TensorRT logger at VERBOSE for details")
            runner.stream.synchronize()
            del keep
        cache.lengths[:batch] += counts
        return to_numpy(logits)
