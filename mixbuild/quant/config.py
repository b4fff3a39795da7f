"""Quantization options as one validated, frozen value."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from mixbuild.contract import Precision, quantized_precision
from mixbuild.errors import UsageError, choice
from mixbuild.schemes import FLOAT, Scheme, scheme_named, scheme_of

if TYPE_CHECKING:  # pragma: no cover
    from mixbuild.model.spec import MixtralSpec


class Int4Method(str, Enum):
    AWQ = "awq"
    RTN = "rtn"


class LmHead(str, Enum):
    """What an int4 export does with lm_head."""
    FLOAT = "float"   # stays in --dtype (the default)
    INT8 = "int8"     # int8 weights, groups of group_size along K
    INT4 = "int4"     # int4 weights, like the attention linears

    @property
    def quantized(self) -> bool:
        return self is not LmHead.FLOAT

    @property
    def scheme(self) -> Scheme:
        return scheme_named(self.value)


@dataclass(frozen=True)
class QuantConfig:
    precision: Precision
    int4_method: Int4Method = Int4Method.AWQ
    group_size: int = 128
    fp8_per_channel: bool = True        # weight scales per output channel (else per tensor)
    calib_file: Path | None = None
    calib_tokens: int = 4096            # calibration tokens (sequences of calib_seq_len)
    calib_seq_len: int = 256
    awq_grid: int = 20                  # alphas 0, 1/grid, ..., 1
    gptq: bool = True                   # GPTQ rounding (error feedback) instead of nearest
    lm_head: LmHead = LmHead.FLOAT      # int4: lm_head quantized too (GPTQ on the final norm's output)
    # calibrate layer i + 1 on quantized layer i's output (None: the precision's default, int4
    # yes, fp8 no: measured on the fixture, docs/precision.md)
    propagate: bool | None = None
    # an expert's GPTQ Hessian: this share from its routed tokens, the rest from all tokens
    # (None: the precision's default, int4 0.3, fp8 0.9)
    routed_weight: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.precision, Precision) or not self.precision.quantized:
            raise UsageError("unknown quantized precision", expected="fp8 | int4",
                             found=repr(self.precision))
        if self.propagate is None:
            object.__setattr__(self, "propagate", self.scheme.propagate)
        if self.routed_weight is None:
            object.__setattr__(self, "routed_weight", self.scheme.routed_weight)
        self.validate()

    @property
    def scheme(self) -> Scheme:
        """The weight scheme of everything quantized but lm_head."""
        return scheme_of(self.precision)

    @property
    def head_scheme(self) -> Scheme:
        """lm_head's scheme: FLOAT unless --lm-head quantizes it."""
        return self.lm_head.scheme if isinstance(self.lm_head, LmHead) else FLOAT

    @property
    def smooths(self) -> bool:
        """Whether calibration searches AWQ smoothing scales."""
        return self.scheme.smoothing and self.int4_method is Int4Method.AWQ

    def validate(self) -> None:
        if self.group_size <= 0 or self.group_size % 2:
            raise UsageError("--group-size must be a positive even number", found=str(self.group_size))
        if self.calib_tokens < self.calib_seq_len or self.calib_seq_len < 8:
            raise UsageError("calibration needs at least one sequence of >= 8 tokens",
                             found=f"{self.calib_tokens} tokens in sequences of {self.calib_seq_len}")
        if not 0.0 <= self.routed_weight <= 1.0:
            raise UsageError("the experts' routed-token weight must be in [0, 1]",
                             found=str(self.routed_weight))
        if not isinstance(self.lm_head, LmHead):
            raise UsageError("unknown lm_head quantization", expected="float | int8 | int4",
                             found=repr(self.lm_head))
        if self.lm_head.quantized and not self.scheme.quantized_head:
            raise UsageError(f"--lm-head {self.lm_head.value} is an int4 option",
                             expected=f"--precision int4 with --lm-head {self.lm_head.value}",
                             found=f"--precision {self.precision.value}",
                             hint="drop --lm-head: fp8 keeps lm_head in --dtype (design rule: "
                                  "its logits feed sampling directly)")
        if self.calib_file is not None and not Path(self.calib_file).is_file():
            raise UsageError(f"calibration file not found: {self.calib_file}",
                             hint="pass a UTF-8 text file with --calib, or omit it for the built-in text")

    def check_spec(self, spec: MixtralSpec) -> None:
        """Refuse (UsageError) a model the scheme cannot quantize with these options (int4: a
        group size that does not divide every reduction size K), before any work."""
        self.scheme.check_spec(spec, self)

    @classmethod
    def parse(cls, precision: str, **kwargs) -> QuantConfig:
        if "int4_method" in kwargs:
            kwargs["int4_method"] = choice(Int4Method, kwargs["int4_method"], "int4 method")
        if isinstance(kwargs.get("lm_head"), str):
            kwargs["lm_head"] = choice(LmHead, kwargs["lm_head"], "lm_head quantization")
        return cls(precision=quantized_precision(precision), **kwargs)

    def to_dict(self) -> dict:
        return {"precision": self.precision.value, "int4_method": self.int4_method.value,
                "group_size": self.group_size, "fp8_per_channel": self.fp8_per_channel,
                "calib_file": Path(self.calib_file).name if self.calib_file else None,
                "calib_tokens": self.calib_tokens, "calib_seq_len": self.calib_seq_len,
                "rounding": "gptq" if self.gptq else "nearest",
                "lm_head": self.lm_head.value,
                "inputs": "quantized layers" if self.propagate else "float layers",
                "expert_routed_weight": self.routed_weight}
