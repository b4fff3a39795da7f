"""Kernel launch parameters as data: JSON files keyed by shape, device and dtype.

One file per (E, N, K, device, dtype), named

    E={E},N={N},K={K},device_name={device},dtype={dtype}.json

with N = I (intermediate size) and K = H (hidden size) of the experts, `device` the CUDA device
name with spaces replaced by underscores (e.g. NVIDIA_H100_80GB_HBM3), and `dtype` one of
DTYPE_KEYS. The file holds one entry per token count M (= T, tokens per call):

    {"format": 1, "meta": {...free-form provenance...},
     "configs": {"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128,
                       "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 4}, "64": {...}}}

The same entry drives both grouped GEMMs (they share the slot alignment, hence BLOCK_SIZE_M).
Lookup takes the entry with the nearest M (ties to the smaller M); without a file, a heuristic
default is used. scripts/tune_moe.py writes these files.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mixbuild.contract import QuantScheme
from mixbuild.errors import ArtifactError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_DIR_ENV = "MIXBUILD_MOE_CONFIG_DIR"   # an extra directory searched first
FORMAT_VERSION = 1
DTYPE_KEYS = ("fp32", "fp16", "bf16", "fp8_w8a8", "int4_w4a16")

_JSON_NAMES = {"block_m": "BLOCK_SIZE_M", "block_n": "BLOCK_SIZE_N", "block_k": "BLOCK_SIZE_K",
               "group_m": "GROUP_SIZE_M", "num_warps": "num_warps", "num_stages": "num_stages"}


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of the grouped GEMMs (block sizes: powers of 2, >= 16)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def problems(self) -> list[str]:
        """What is wrong with this config (empty when valid)."""
        found = []
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                found.append(f"{name}={value} is not a power of two >= 16")
        for name in ("group_m", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                found.append(f"{name}={getattr(self, name)} is not positive")
        return found

    def to_json(self) -> dict[str, int]:
        return {_JSON_NAMES[key]: value for key, value in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict, where: str = "config") -> KernelConfig:
        unknown = set(data) - set(_JSON_NAMES.values())
        if unknown:
            raise ArtifactError(f"{where} has unknown keys",
                                expected=", ".join(_JSON_NAMES.values()),
                                found=", ".join(sorted(unknown)))
        by_json = {json_name: key for key, json_name in _JSON_NAMES.items()}
        config = cls(**{by_json[name]: int(value) for name, value in data.items()})
        if config.problems():
            raise ArtifactError(f"{where} is invalid", found="; ".join(config.problems()))
        return config


# the `dtype` part of a quantized scheme's config file names (vLLM's fused-MoE config names)
_SCHEME_KEYS = {QuantScheme.FP8: "fp8_w8a8", QuantScheme.INT4: "int4_w4a16"}


def dtype_key(dtype: torch.dtype, scheme: QuantScheme | str = QuantScheme.NONE) -> str:
    """The `dtype` part of a config file name for an activation dtype and a quantization scheme."""
    return _SCHEME_KEYS.get(QuantScheme.parse(scheme)) or \
        {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def device_key(device: torch.device | str | None = None) -> str:
    """CUDA device name with spaces replaced by underscores ('cpu' off the GPU)."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device).replace(" ", "_")


def config_file_name(E: int, N: int, K: int, device: str, dtype: str) -> str:
    return f"E={E},N={N},K={K},device_name={device},dtype={dtype}.json"


def default_config(M: int, E: int, top_k: int = 2) -> KernelConfig:
    """Heuristic config when no tuned file exists: small tiles for decode, large for prefill."""
    slots_per_expert = max(1, M * top_k // max(E, 1))
    if slots_per_expert <= 16:
        return KernelConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4,
                            num_stages=4)
    if slots_per_expert <= 64:
        return KernelConfig(block_m=32, block_n=64, block_k=64, group_m=8, num_warps=4,
                            num_stages=4)
    return KernelConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=8,
                        num_stages=3)


def get_config(M: int, *, E: int, N: int, K: int, device: str, dtype: str,
               top_k: int = 2) -> KernelConfig:
    """The tuned config for the nearest token count M, or default_config when none is stored."""
    table = load_configs(E, N, K, device, dtype)
    if not table:
        return default_config(M, E, top_k)
    nearest = min(table, key=lambda m: (abs(m - M), m))
    return table[nearest]


def search_dirs() -> list[Path]:
    extra = os.environ.get(CONFIG_DIR_ENV)
    return ([Path(extra)] if extra else []) + [CONFIG_DIR]


@functools.cache
def load_configs(E: int, N: int, K: int, device: str, dtype: str) -> dict[int, KernelConfig]:
    """{M: KernelConfig} from the first matching file in search_dirs(), or {} when none exists."""
    name = config_file_name(E, N, K, device, dtype)
    for directory in search_dirs():
        path = directory / name
        if path.is_file():
            return read_config_file(path)
    return {}


def read_config_file(path: Path) -> dict[int, KernelConfig]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read MoE kernel config {path}", found=str(exc),
                            hint="regenerate it with scripts/tune_moe.py") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION \
            or not isinstance(data.get("configs"), dict):
        raise ArtifactError(f"MoE kernel config {path} has an unexpected layout",
                            expected=f'{{"format": {FORMAT_VERSION}, "configs": {{M: {{...}}}}}}',
                            found=str(data)[:200])
    return {int(m): KernelConfig.from_json(entry, f"{path}: M={m}")
            for m, entry in data["configs"].items()}


def write_config_file(path: Path, configs: dict[int, KernelConfig],
                      meta: dict | None = None) -> Path:
    """Write {M: KernelConfig} in the file format above (sorted by M)."""
    data = {"format": FORMAT_VERSION, "meta": meta or {},
            "configs": {str(m): configs[m].to_json() for m in sorted(configs)}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path
