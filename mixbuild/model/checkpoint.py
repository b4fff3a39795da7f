"""Lazy, checked reading of Hugging Face Mixtral checkpoints (single-file or sharded safetensors).

Nothing is read eagerly: headers are parsed to learn names, shapes, dtypes and offsets, and each
tensor is memory-mapped when it is asked for, so a checkpoint far larger than RAM can be walked
one tensor (or one decoder layer) at a time.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mixbuild.contract import (
    CHAT_TEMPLATE_FILE,
    HF_CONFIG_FILE,
    HF_GENERATION_FILE,
    HF_INDEX_FILE,
    HF_WEIGHTS_FILE,
    SPECIAL_TOKENS_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    DType,
)
from mixbuild.errors import CheckpointError
from mixbuild.model.names import ExpectedTensor, expected_tensors, tensor_name
from mixbuild.model.spec import MixtralSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE, HF_GENERATION_FILE,
                   CHAT_TEMPLATE_FILE)

# safetensors dtype codes of the weights mixbuild reads
_SAFETENSORS_DTYPES = {"F32": DType.FP32, "F16": DType.FP16, "BF16": DType.BF16}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str          # safetensors dtype code: F32, F16, BF16
    shape: tuple[int, ...]
    nbytes: int
    offset: int         # absolute byte offset of the data in the file


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that the file holds every byte it promises."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: file is truncated (no safetensors header)",
                                      found=f"{size} bytes", hint="download the file again")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: corrupt safetensors header",
                                      expected=f"header length <= {min(_MAX_HEADER, size - 8)}",
                                      found=str(header_len), hint="download the file again")
            header = json.loads(fh.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)", found=str(exc),
                              hint="download the file again") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read weight file", found=str(exc)) from exc
    header.pop("__metadata__", None)
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt header entry for tensor '{name}'",
                                  found=repr(entry)[:200], hint="download the file again") from exc
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype",
                                  expected="F32, F16 or BF16", found=dtype)
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * _SAFETENSORS_DTYPES[dtype].nbytes
        if end - start != nbytes:
            raise CheckpointError(f"{path}: tensor '{name}' has inconsistent byte range",
                                  expected=f"{nbytes} bytes for {dtype}{list(shape)}",
                                  found=f"{end - start} bytes", hint="download the file again")
        data_end = max(data_end, end)
        infos[name] = TensorInfo(name, path, dtype, shape, end - start, 8 + header_len + start)
    if 8 + header_len + data_end > size:
        raise CheckpointError(f"{path}: file is truncated",
                              expected=f"{8 + header_len + data_end} bytes", found=f"{size} bytes",
                              hint="the download or copy was interrupted; fetch the file again")
    return infos


def check_finite_tensor(t, name: str, file: Path | str | None = None) -> None:
    """A CheckpointError naming tensor `name` when `t` holds NaN or Inf values."""
    import torch

    from mixbuild.tensors import all_finite

    if all_finite(t):
        return
    finite = torch.isfinite(t)
    nan, total = int(torch.isnan(t).sum()), t.numel()
    inf = total - int(finite.sum()) - nan
    first = tuple(int(i) for i in torch.nonzero(~finite)[0])
    where = f" of {Path(file).name}" if file is not None else ""
    raise CheckpointError(f"tensor '{name}' holds NaN or Inf values",
                          expected="finite values only",
                          found=f"{nan} NaN and {inf} Inf among its {total} values{where}, the "
                                f"first at index {list(first)}",
                          hint="the weight file is corrupt, or the model it was saved from had "
                               "diverged; download the checkpoint again or fix it at the source")


class Checkpoint:
    """A Hugging Face Mixtral checkpoint directory: spec, tensor index and lazy tensor access."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.path}",
                                  hint="pass a directory holding config.json and *.safetensors")
        self.spec = MixtralSpec.from_file(self.path / HF_CONFIG_FILE)
        self.tensors = self._index()

    # ------------------------------------------------------------------ index
    def _weight_files(self) -> tuple[list[Path], dict[str, str] | None]:
        index_path = self.path / HF_INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path}: corrupt index (no 'weight_map')",
                                      found=str(exc)) from exc
            files = sorted({self.path / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"missing shard {f.name} (listed in {HF_INDEX_FILE})",
                                          hint="download every shard the index lists")
            return files, weight_map
        single = self.path / HF_WEIGHTS_FILE
        if single.is_file():
            return [single], None
        pickles = sorted(p.name for p in self.path.glob("*.bin")) + sorted(
            p.name for p in self.path.glob("*.pt"))
        raise CheckpointError(
            f"{self.path}: no safetensors weights",
            expected=f"{HF_WEIGHTS_FILE} or {HF_INDEX_FILE} with its shards",
            found=", ".join(pickles) or "no weight files",
            hint="mixbuild never loads pickled weights; convert them to safetensors first"
            if pickles else "check the path")

    def _index(self) -> dict[str, TensorInfo]:
        files, weight_map = self._weight_files()
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_safetensors_header(f).items():
                if name in tensors:
                    raise CheckpointError(f"tensor '{name}' is stored twice",
                                          found=f"{tensors[name].file.name} and {f.name}")
                tensors[name] = info
        if weight_map is not None:
            for name, file in weight_map.items():
                where = tensors.get(name)
                if where is None or where.file.name != file:
                    raise CheckpointError(f"index lists tensor '{name}' in {file}, but it is not there",
                                          found=f"in {where.file.name}" if where else "in no shard",
                                          hint="the index and shards come from different downloads")
        return tensors

    # ------------------------------------------------------------------ checks
    def verify(self) -> dict[str, ExpectedTensor]:
        """Every expected tensor present with the right shape, and no tensor left unused."""
        expected = expected_tensors(self.spec)
        for name, want in expected.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"missing tensor '{name}'",
                                      expected=f"{want.role} of shape {list(want.shape)}",
                                      hint="the checkpoint is incomplete or does not match config.json")
            if info.shape != want.shape:
                raise CheckpointError(f"tensor '{name}' has the wrong shape",
                                      expected=str(list(want.shape)), found=str(list(info.shape)),
                                      hint="config.json and the weights disagree")
        allowed_extra = {tensor_name("lm_head")} if self.spec.tie_word_embeddings else set()
        unused = sorted(set(self.tensors) - set(expected) - allowed_extra)
        if unused:
            more = f" (+{len(unused) - 3} more)" if len(unused) > 3 else ""
            raise CheckpointError("checkpoint holds tensors no Mixtral layer uses",
                                  found=", ".join(unused[:3]) + more,
                                  hint="config.json may describe fewer layers or experts than the weights")
        return expected

    def check_values(self) -> Iterator[str]:
        """Read every tensor once (one at a time) and fail on NaN or Inf. Yields names as it goes."""
        for name in sorted(self.verify()):
            self.tensor(name)  # every read checks its values
            yield name

    # ------------------------------------------------------------------ access
    def tensor(self, name: str, check_finite: bool = True):
        """One tensor as a torch.Tensor, read into its own buffer.

        Plain reads (not a memory map) keep the process's resident memory equal to what it
        really holds: mapped pages of a file read once would count as resident until unmapped.
        Every read checks that the values are finite (a CheckpointError naming the tensor
        otherwise), so no stage that reads weights (export, calibration, the torch backend) can
        turn a corrupt checkpoint into an output; the check costs one pass over memory the
        read has just filled.
        """
        import torch

        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"missing tensor '{name}'")
        buffer = bytearray(info.nbytes)
        with info.file.open("rb") as fh:
            fh.seek(info.offset)
            if fh.readinto(buffer) != info.nbytes:
                raise CheckpointError(f"{info.file}: file is truncated while reading '{name}'",
                                      hint="the file changed after it was opened; fetch it again")
        if not buffer:
            return torch.empty(info.shape, dtype=_SAFETENSORS_DTYPES[info.dtype].torch)
        t = torch.frombuffer(buffer, dtype=_SAFETENSORS_DTYPES[info.dtype].torch).reshape(info.shape)
        if check_finite:
            check_finite_tensor(t, name, info.file)
        return t

    def weight(self, role: str, layer: int | None = None, expert: int | None = None):
        if role == "lm_head" and self.spec.tie_word_embeddings:
            role = "embed"
        return self.tensor(tensor_name(role, layer, expert))

    def _stack(self, shape: tuple[int, ...], parts) -> torch.Tensor:
        """Fill one preallocated tensor part by part (no concatenation copies)."""
        import torch

        out = None
        for index, tensor in parts:
            if out is None:
                out = torch.empty(shape, dtype=tensor.dtype)
            out[index] = tensor
        return out

    def expert_gate_up(self, layer: int):
        """The layer's experts' w1 and w3 stacked as mixbuild holds them: [E, 2I, H], w1 rows first."""
        s = self.spec
        i = s.intermediate_size
        parts = ((((e, slice(0, i)) if r == "w1" else (e, slice(i, 2 * i))), self.weight(r, layer, e))
                 for e in range(s.num_experts) for r in ("w1", "w3"))
        return self._stack((s.num_experts, 2 * i, s.hidden_size), parts)

    def expert_down(self, layer: int):
        """The layer's experts' w2 stacked: [E, H, I]."""
        s = self.spec
        parts = ((e, self.weight("w2", layer, e)) for e in range(s.num_experts))
        return self._stack((s.num_experts, s.hidden_size, s.intermediate_size), parts)

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    @property
    def stored_dtypes(self) -> list[str]:
        return sorted({info.dtype for info in self.tensors.values()})

    def tokenizer_files(self) -> list[Path]:
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]
