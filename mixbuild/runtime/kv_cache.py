"""The KV cache the generation layer owns.

The concat layout (the serving layout's `StaticCache` is at the end of this module): the ONNX
contract feeds ``past`` [B, Nkv, P, D] and returns ``present`` [B, Nkv, P+S, D]: the graph
itself concatenates, so each step necessarily writes the whole cache once. `AdoptedCache`
keeps the arrays the runner returned (ONNX Runtime's own present outputs, torch, TensorRT
through numpy) and feeds them back as the next past, without copying; `OrtValueCache` does the
same with OrtValues on the session's device.

Both shrink the batch when sequences finish (`compact`): the surviving rows are gathered and
the left-padding columns that every survivor shares are dropped.
"""

from __future__ import annotations

import numpy as np

from mixbuild.contract import kv_pairs
from mixbuild.model.spec import MixtralSpec


def cache_names(spec: MixtralSpec) -> list[tuple[str, str]]:
    """(past input name, present output name) for every cache tensor, in layer order."""
    return kv_pairs(spec.num_layers)


class AdoptedCache:
    """Feeds back the present arrays a runner returned (no copy, no preallocation)."""

    def __init__(self, spec: MixtralSpec, dtype=np.float32) -> None:
        self.spec = spec
        self.dtype = np.dtype(dtype)
        self.names = cache_names(spec)
        self.arrays: list[np.ndarray] = []
        self.batch = 0
        self.length = 0

    def reset(self, batch: int, max_length: int) -> None:
        empty = np.zeros((batch, self.spec.num_kv_heads, 0, self.spec.head_dim), self.dtype)
        self.arrays = [empty] * len(self.names)
        self.batch, self.length = batch, 0

    def past(self, index: int) -> np.ndarray:
        return self.arrays[index]

    def adopt(self, outputs: dict[str, np.ndarray], seq: int) -> None:
        self.arrays = [outputs[present] for _, present in self.names]
        self.length += seq

    def compact(self, keep: np.ndarray, trim: int = 0) -> None:
        self.arrays = [np.ascontiguousarray(a[keep, :, trim:]) for a in self.arrays]
        self.batch, self.length = len(keep), self.length - trim


class OrtValueCache:
    """The cache as ONNX Runtime OrtValues on a device: the presents ORT allocated there are fed
    back as past without leaving it. Shrinking the batch (rare) goes through host memory."""

    def __init__(self, spec: MixtralSpec, dtype=np.float32, device: str = "cpu") -> None:
        self.spec = spec
        self.dtype = np.dtype(dtype)
        self.device = device
        self.names = cache_names(spec)
        self.values: list = []
        self.batch = 0
        self.length = 0

    def _upload(self, array: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, self.dtype), self.device, 0)

    def reset(self, batch: int, max_length: int) -> None:
        empty = self._upload(np.zeros((batch, self.spec.num_kv_heads, 0, self.spec.head_dim)))
        self.values = [empty] * len(self.names)
        self.batch, self.length = batch, 0

    def adopt(self, values: list, seq: int) -> None:
        self.values = values
        self.length += seq

    def compact(self, keep: np.ndarray, trim: int = 0) -> None:
        self.values = [self._upload(v.numpy()[keep, :, trim:]) for v in self.values]
        self.batch, self.length = len(keep), self.length - trim


class StaticCache:
    """The serving layout's cache: per layer one key and one value buffer [max_batch, Nkv, C, D]
    allocated once, which the graph updates in place; row b holds `lengths[b]` valid positions.

    A call with B <= max_batch rows uses rows 0..B-1, a contiguous prefix of every buffer, so
    the same memory is bound whatever the batch. Nothing is copied per step; rows move only when
    finished requests leave the batch (compact)."""

    def __init__(self, spec: MixtralSpec, capacity: int, max_batch: int, dtype=np.float32) -> None:
        from mixbuild.contract import cache_pairs

        self.spec = spec
        self.dtype = dtype if hasattr(dtype, "is_floating_point") else np.dtype(dtype)
        self.capacity, self.max_batch = capacity, max_batch
        self.names = cache_pairs(spec.num_layers)
        shape = (max_batch, spec.num_kv_heads, capacity, spec.head_dim)
        self.buffers = [self._allocate(shape) for _ in self.names]
        self.lengths = np.zeros(max_batch, np.int64)
        self.batch = 0
        self.binding = None          # the IOBinding this cache is bound to (ServingStep's)
        self.bound_batch = None      # the (first, end) rows bound there

    def _allocate(self, shape: tuple[int, ...]):
        return np.zeros(shape, self.dtype)

    @property
    def length(self) -> int:
        return int(self.lengths[:self.batch].max()) if self.batch else 0

    def reset(self, batch: int, max_length: int) -> None:
        if batch > self.max_batch or max_length > self.capacity:
            from mixbuild.errors import UsageError

            raise UsageError("the request does not fit the serving cache",
                             expected=f"at most {self.max_batch} rows of {self.capacity} positions",
                             found=f"{batch} rows, up to {max_length} positions",
                             hint="load the model with a larger max_batch / max_context")
        self.batch = batch
        self.lengths[:] = 0

    def shape(self) -> list[int]:
        return [self.batch, self.spec.num_kv_heads, self.capacity, self.spec.head_dim]

    def check_room(self, batch: int, seq: int) -> None:
        """Refuse a step that would write past the capacity (UsageError)."""
        if np.any(self.lengths[:batch] + seq > self.capacity):
            from mixbuild.errors import UsageError

            raise UsageError("the serving cache is full", expected=f"<= {self.capacity} positions",
                             found=f"{int(self.lengths[:batch].max()) + seq}",
                             hint="load the model with a larger max_context")

    def compact(self, keep: np.ndarray, trim: int = 0) -> None:
        """Keep rows `keep` (ascending), moved to the front; `trim` (left padding of the concat
        layout) does not apply: rows hold no padding here."""
        for buffer in self.buffers:
            buffer[:len(keep)] = self._rows(buffer, keep)
        self.lengths[:len(keep)] = self.lengths[keep]
        self.batch = len(keep)

    def move_row(self, src: int, dst: int) -> None:
        """Row `src`'s valid positions (and length) into row `dst` (a freed slot)."""
        length = int(self.lengths[src])
        for buffer in self.buffers:
            buffer[dst, :, :length] = buffer[src, :, :length]
        self.lengths[dst] = length

    @staticmethod
    def _rows(buffer, keep: np.ndarray):
        return buffer[keep]


class TorchStaticCache(StaticCache):
    """StaticCache with torch tensors on the model's device (the torch backend): the same rows,
    lengths and compaction; the model writes the tensors in place."""

    def __init__(self, spec: MixtralSpec, capacity: int, max_batch: int, dtype, device) -> None:
        self.device = device
        super().__init__(spec, capacity, max_batch, dtype)   # dtype: a torch dtype

    def _allocate(self, shape: tuple[int, ...]):
        import torch

        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @staticmethod
    def _rows(buffer, keep: np.ndarray):
        import torch

        return buffer.index_select(0, torch.as_tensor(keep, device=buffer.device))
