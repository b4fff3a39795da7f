"""The pieces of the MoE TensorRT plugins that need no TensorRT class: the attribute
dataclasses, PluginField encoding and decoding, and torch views of TensorRT's device pointers.

trt_classes builds the IPluginV3 classes from these; trt_plugins registers them. Nothing here
imports TensorRT, torch or numpy at import time.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from dataclasses import fields as dataclass_fields

from mixbuild.contract import EXPERTS_OP, GATE_OP, QuantScheme
from mixbuild.errors import UsageError

GATE_PLUGIN = GATE_OP          # plugin names are the op names (namespace contract.PLUGIN_NAMESPACE)
EXPERTS_PLUGIN = EXPERTS_OP
ACTIVATIONS = ("silu",)
QUANT_INPUTS = {QuantScheme.NONE: (), QuantScheme.INT4: ("w_gate_up_scale", "w_down_scale"),
                QuantScheme.FP8: ("w_gate_up_scale", "w_down_scale", "act_scale_gate_up",
                                  "act_scale_down")}


# ------------------------------------------------------------------------- attributes (fields)

@dataclass(frozen=True)
class GateAttrs:
    """Attributes of MoEGate."""

    top_k: int
    normalize: bool = True

    def validate(self) -> GateAttrs:
        if self.top_k < 1:
            raise UsageError("MoEGate top_k must be positive", found=str(self.top_k))
        return self


@dataclass(frozen=True)
class ExpertsAttrs:
    """Attributes of MoEExperts."""

    activation: str = "silu"
    quantization: QuantScheme = QuantScheme.NONE
    group_size: int = 0

    def validate(self) -> ExpertsAttrs:
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
