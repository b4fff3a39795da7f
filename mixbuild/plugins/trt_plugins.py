"""TensorRT plugins for the MoE ops: MoEGate and MoEExperts, namespace "mixbuild", version "1".

Shape legend: T tokens, E experts, H hidden, I intermediate, k top-k.

    MoEGate     in:  router_logits [T, E] float / half / bf16
                out: weights [T, k] float, expert_ids [T, k] int32
                fields: top_k (int), normalize (int 0/1)
    MoEExperts  in:  hidden [T, H], weights [T, k] float, expert_ids [T, k] int32,
                     w_gate_up, w_down, then by quantization:
                       fp8:  w_gate_up_scale, w_down_scale, act_scale_gate_up, act_scale_down
                       int4: w_gate_up_scale, w_down_scale
                out: [T, H] in the dtype of hidden
                fields: activation ("silu"), quantization ("none" | "fp8" | "int4"), group_size
    (layouts: formats.py; fp8 weights may be typed FP8 or UINT8, int4 weights UINT8 [E, N, K/2] or
    INT4 [E, N, K], the same bytes.)

The plugins are IPluginV3 (OneCore + OneBuild + OneRuntime) written in Python against the API that
`tensorrt` and `tensorrt_rtx` share; `trt_module(backend)` picks the module lazily. enqueue wraps
TensorRT's device pointers as torch tensors and launches the Triton kernels on TensorRT's stream.
The classes are built per module on first use (`plugin_classes(trt)`), so this file imports
neither TensorRT nor Triton at import time.
"""

from __future__ import annotations

import functools

from mixbuild.contract import PLUGIN_NAMESPACE, EngineBackend
from mixbuild.errors import MissingDependencyError, UsageError
from mixbuild.plugins import trt_classes


def trt_module(backend: EngineBackend | str = EngineBackend.TENSORRT):
    """Import `tensorrt` or `tensorrt_rtx` lazily (MissingDependencyError names the extra)."""
    backend = EngineBackend.parse(backend)
    import importlib

    try:
        return importlib.import_module(backend.module)
    except ImportError as exc:
        raise MissingDependencyError(backend.module, backend.extra, "building or running "
                                     "TensorRT engines with the MoE plugins") from exc


# ------------------------------------------------------------------------------ plugin classes

@functools.cache
def plugin_classes(trt) -> dict[str, type]:
    """The plugin and creator classes for one TensorRT module (tensorrt or tensorrt_rtx)."""
    return trt_classes.define(trt)


def register_plugins(backend: EngineBackend | str = EngineBackend.TENSORRT) -> list:
    """Register the MoEGate and MoEExperts creators in TensorRT's registry (namespace mixbuild).

    Idempotent; returns the creators registered by this process.
    """
    trt = trt_module(backend)
    return _register(trt)


@functools.cache
def _register(trt) -> list:
    classes = plugin_classes(trt)
    registry = trt.get_plugin_registry()
    creators = [classes["GateCreator"](), classes["ExpertsCreator"]()]
    for creator in creators:
        if not registry.register_creator(creator, PLUGIN_NAMESPACE):
            raise UsageError(f"could not register the TensorRT plugin {creator.name}",
                             hint="another creator with the same name, version and namespace "
                                  f"'{PLUGIN_NAMESPACE}' is already registered")
    return creators
