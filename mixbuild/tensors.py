"""Tensor conversions between torch, numpy and onnx_ir, shared by every stage.

torch, numpy, ml_dtypes and onnx_ir are imported inside the functions, so importing this module
costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def as_numpy(t):
    """A numpy view of a CPU torch tensor, with ml_dtypes for bfloat16 and float8 (no copy)."""
    import ml_dtypes
    import torch

    t = t.contiguous()
    views = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
             torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn)}
    if t.dtype in views:
        raw, np_dtype = views[t.dtype]
        return t.view(raw).numpy().view(np_dtype)
    return t.numpy()


def to_numpy(t):
    """A torch tensor on any device as a host numpy array (bfloat16, which numpy lacks, as
    float32)."""
    import torch

    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def lazy_tensor(loader: Callable, dtype, shape, name: str):
    """An onnx_ir initializer whose data `loader()` (a torch tensor) produces only when it is
    written. dtype "int4" means the loader returns the packed uint8 bytes of an ONNX INT4 tensor."""
    import onnx_ir as ir

    if dtype == "int4":
        def load_packed():
            return ir.PackedTensor(loader().numpy(), ir.DataType.INT4, shape=shape, name=name)
        return ir.LazyTensor(load_packed, dtype=ir.DataType.INT4, shape=ir.Shape(shape), name=name)

    ir_dtype = ir.tensor_adapters.from_torch_dtype(dtype)

    def load():  # a numpy-backed tensor is written with ndarray.tofile: no extra bytes copy
        return ir.Tensor(as_numpy(cast_finite(loader(), dtype, name)), dtype=ir_dtype,
                         name=name)

    return ir.LazyTensor(load, dtype=ir_dtype, shape=ir.Shape(shape), name=name)


def all_finite(t, chunk: int = 1 << 24) -> bool:
    """Whether a torch tensor holds no NaN and no Inf, checked `chunk` elements at a time so
    the temporary mask stays small (a layer's stacked experts are gigabytes)."""
    import torch

    if not (t.is_floating_point() or t.is_complex()):
        return True
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def cast_finite(t, dtype, name: str,
                overflow_hint: str = "export with --dtype bf16 or fp32, which hold the range"):
    """`t.to(dtype)`; for a float32 / float16 / bfloat16 target, a CheckpointError when the cast
    produced NaN or Inf (checkpoint reads are checked already, so this is an overflow: e.g. a
    bf16 or fp32 weight beyond float16's range of +-65504)."""
    import torch

    from mixbuild.errors import CheckpointError

    out = t.to(dtype)
    if dtype in (torch.float32, torch.float16, torch.bfloat16) and not all_finite(out):
        bad = out.numel() - int(torch.isfinite(out).sum())
        source = "" if t.dtype == dtype else f" converted from {str(t.dtype).removeprefix('torch.')}"
        raise CheckpointError(
            f"weight '{name}' is not finite as {str(dtype).removeprefix('torch.')}{source}",
            expected="finite values only", found=f"{bad} of {out.numel()} values are NaN or Inf",
            hint=f"the values exceed the range of that dtype: {overflow_hint}"
            if t.dtype != dtype else "the weights are corrupt; check the checkpoint")
    return out


# ONNX element type -> the numpy type of its stored bytes (fp8: uint8 bit patterns, int4: packed
# bytes, bfloat16: uint16 bit patterns)
_STORED = {1: "float32", 10: "float16", 2: "uint8", 3: "int8", 17: "uint8", 16: "uint16",
           22: "uint8"}


def initializer_array(tensor, directory):
    """An initializer (onnx TensorProto, its data in the file `directory` holds or inline) as
    numpy: fp8 as uint8 bit patterns, int4 as packed bytes [..., K/2], bfloat16 as float32."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    dtype = np.dtype(_STORED[tensor.data_type])
    data = np.memmap(Path(directory) / info["location"], dtype=np.uint8, mode="r",
                     offset=int(info.get("offset", 0)), shape=(int(info["length"]),))
    array = np.array(data).view(dtype)
    dims = list(tensor.dims)
    if tensor.data_type == 16:  # bfloat16 -> float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    if tensor.data_type == onnx.TensorProto.INT4:  # packed: two values per byte along K
        dims[-1] //= 2
    return array.reshape(tuple(dims))
