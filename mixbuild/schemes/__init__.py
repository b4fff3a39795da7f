"""Weight schemes: one object per format (float, fp8, int4, and int8 for lm_head) that owns its
quantizer, its ONNX graph form and MoE function body, its Hugging Face writer and reader, and
its ONNX Runtime kernels (the interface: mixbuild/schemes/base.py).

The stages ask the scheme instead of comparing precisions; a new scheme (fp8 KV cache, NVFP4,
W4A8) is a module here, its entry in SCHEMES, and its name in contract.Precision.
"""

from __future__ import annotations

from mixbuild.contract import Precision
from mixbuild.schemes.base import FLOAT, Scheme
from mixbuild.schemes.fp8 import FP8
from mixbuild.schemes.int4 import INT4, INT8

SCHEMES: dict[str, Scheme] = {s.name: s for s in (FLOAT, FP8, INT4, INT8)}


def scheme_of(precision: Precision) -> Scheme:
    """The scheme of an artifact's precision; the float precisions (fp32, fp16, bf16) share
    FLOAT, whose weights are the graph's float type."""
    return SCHEMES[precision.value] if precision.quantized else FLOAT


def scheme_named(name: str) -> Scheme:
    """The scheme a manifest or option names ("float", "fp8", "int4", "int8")."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown weight scheme {name!r}: expected one of "
                         f"{', '.join(SCHEMES)}") from None


__all__ = ["FLOAT", "FP8", "INT4", "INT8", "SCHEMES", "Scheme", "scheme_named", "scheme_of"]
