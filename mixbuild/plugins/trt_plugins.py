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
from dataclasses import MISSING, dataclass, fields as dataclass_fields

from mixbuild.errors import MissingDependencyError, UsageError
from mixbuild.plugins.formats import QuantScheme

PLUGIN_NAMESPACE = "mixbuild"
PLUGIN_VERSION = "1"
GATE_PLUGIN = "MoEGate"
EXPERTS_PLUGIN = "MoEExperts"
ACTIVATIONS = ("silu",)
BACKEND_MODULES = {"trt": "tensorrt", "trt-rtx": "tensorrt_rtx"}   # backend (= extra) -> module
QUANT_INPUTS = {QuantScheme.NONE: (), QuantScheme.INT4: ("w_gate_up_scale", "w_down_scale"),
                QuantScheme.FP8: ("w_gate_up_scale", "w_down_scale", "act_scale_gate_up",
                                  "act_scale_down")}


def trt_module(backend: str = "trt"):
    """Import `tensorrt` ("trt") or `tensorrt_rtx` ("trt-rtx") lazily."""
    if backend not in BACKEND_MODULES:
        raise UsageError("unknown TensorRT backend", expected=" | ".join(BACKEND_MODULES),
                         found=repr(backend))
    import importlib

    module = BACKEND_MODULES[backend]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module, backend, "building or running TensorRT engines "
                                     "with the MoE plugins") from exc


# ------------------------------------------------------------------------- attributes (fields)

@dataclass(frozen=True)
class GateAttrs:
    """Attributes of MoEGate."""

    top_k: int
    normalize: bool = True

    def validate(self) -> "GateAttrs":
        if self.top_k < 1:
            raise UsageError("MoEGate top_k must be positive", found=str(self.top_k))
        return self


@dataclass(frozen=True)
class ExpertsAttrs:
    """Attributes of MoEExperts."""

    activation: str = "silu"
    quantization: QuantScheme = QuantScheme.NONE
    group_size: int = 0

    def validate(self) -> "ExpertsAttrs":
        if self.activation not in ACTIVATIONS:
            raise UsageError("unsupported MoEExperts activation", expected=" | ".join(ACTIVATIONS),
                             found=repr(self.activation))
        QuantScheme.parse(self.quantization)
        if self.quantization == QuantScheme.INT4 and self.group_size <= 0:
            raise UsageError("int4 MoEExperts needs a positive group_size",
                             found=str(self.group_size))
        return self

    @property
    def num_inputs(self) -> int:
        return 5 + len(QUANT_INPUTS[self.quantization])


def attrs_from_fields(cls, items) -> GateAttrs | ExpertsAttrs:
    """Attributes from (name, value) pairs (values as field_value decodes them).

    Unknown names are ignored (a parser may pass extra node attributes); a missing required
    field or a bad value raises UsageError.
    """
    known = {f.name: f for f in dataclass_fields(cls)}
    values = {}
    for name, value in items:
        if name in ("activation",):
            values[name] = str(value)
        elif name == "quantization":
            values[name] = QuantScheme.parse(str(value))
        elif name == "normalize":
            values[name] = bool(int(value))
        elif name in known:
            values[name] = int(value)
    for name, f in known.items():
        if f.default is MISSING and name not in values:
            raise UsageError(f"TensorRT plugin field '{name}' is missing",
                             expected=f"an integer field '{name}'")
    return cls(**values).validate()


def attrs_to_items(attrs: GateAttrs | ExpertsAttrs) -> list[tuple[str, int | str]]:
    """(name, value) pairs of the attributes: ints, bools as 0/1, strings."""
    items = []
    for f in dataclass_fields(attrs):
        value = getattr(attrs, f.name)
        if isinstance(value, QuantScheme):
            value = value.value
        items.append((f.name, int(value) if isinstance(value, (bool, int)) else str(value)))
    return items


def field_value(trt, field) -> int | float | str:
    """The value of one PluginField: the first number, or the text of a CHAR field."""
    data = field.data
    if field.type == trt.PluginFieldType.CHAR:
        return bytes(data.astype("int8").tobytes()).split(b"\0")[0].decode()
    if field.type in (trt.PluginFieldType.FLOAT32, trt.PluginFieldType.FLOAT64,
                      trt.PluginFieldType.FLOAT16):
        return float(data.reshape(-1)[0])
    return int(data.reshape(-1)[0])


def make_fields(trt, items) -> tuple[object, list]:
    """A PluginFieldCollection from (name, value) pairs, and the arrays it points into.

    PluginField does not own its buffer: keep the returned arrays alive as long as the collection.
    """
    import numpy as np

    arrays, plugin_fields = [], []
    for name, value in items:
        if isinstance(value, str):
            array = np.frombuffer(value.encode() + b"\0", dtype=np.int8).copy()
            kind = trt.PluginFieldType.CHAR
        else:
            array = np.array([value], dtype=np.int32)
            kind = trt.PluginFieldType.INT32
        arrays.append(array)
        plugin_fields.append(trt.PluginField(name, array, kind))
    return trt.PluginFieldCollection(plugin_fields), arrays


# ------------------------------------------------------------------------ tensors from pointers

class _DeviceMemory:
    """A raw CUDA allocation owned by TensorRT, shown to torch through __cuda_array_interface__."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (int(ptr), False), "version": 2}


def torch_dtype(trt, data_type):
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.BF16: torch.bfloat16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT64: torch.int64, trt.DataType.INT8: torch.int8,
             trt.DataType.UINT8: torch.uint8, trt.DataType.FP8: torch.float8_e4m3fn,
             trt.DataType.INT4: torch.uint8}
    return table[data_type]


def device_tensor(trt, ptr: int, desc):
    """A torch view of a TensorRT tensor (INT4 [..., K] is viewed as packed uint8 [..., K/2])."""
    import torch

    shape = list(desc.dims)
    if desc.type == trt.DataType.INT4:
        shape[-1] //= 2
    dtype = torch_dtype(trt, desc.type)
    numel = 1
    for size in shape:
        numel *= size
    if numel == 0:
        return torch.empty(shape, dtype=dtype, device="cuda")
    raw = torch.as_tensor(_DeviceMemory(ptr, numel * dtype.itemsize), device="cuda")
    return raw.view(dtype).view(shape)


def workspace_tensor(ptr: int, nbytes: int):
    import torch

    if nbytes == 0 or not ptr:
        return None
    return torch.as_tensor(_DeviceMemory(ptr, nbytes), device="cuda")


# ------------------------------------------------------------------------------ plugin classes

@functools.lru_cache(maxsize=None)
def plugin_classes(trt) -> dict[str, type]:
    """The plugin and creator classes for one TensorRT module (tensorrt or tensorrt_rtx)."""
    from mixbuild.plugins import trt_classes

    return trt_classes.define(trt)


def register_plugins(backend: str = "trt") -> list:
    """Register the MoEGate and MoEExperts creators in TensorRT's registry (namespace mixbuild).

    Idempotent; returns the creators registered by this process.
    """
    trt = trt_module(backend)
    return _register(trt)


@functools.lru_cache(maxsize=None)
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
