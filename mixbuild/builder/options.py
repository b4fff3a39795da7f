"""Engine build options as frozen, validated values (no option bags, no boolean soup).

    EngineBackend      (mixbuild.contract) which TensorRT: full TensorRT (builds for the local
                       GPU) or TensorRT-RTX (builds ahead of time for a chosen compute
                       capability, no GPU needed)
    MoEMode            plugin: MoE nodes become mixbuild's IPluginV3 layers;
                       inline: TensorRT imports the MoE nodes' ONNX function bodies
    ComputeCapability  an SM version such as 8.9
    Limits             the largest batch / new tokens per call / context the engine accepts
    BuildOptions       all of the above plus builder settings; validate() raises UsageError
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from mixbuild.contract import EngineBackend
from mixbuild.errors import UsageError, choice

MAX_OPT_LEVEL = 5   # TensorRT's builder optimisation levels are 0 (fastest build) .. 5


class MoEMode(str, Enum):
    PLUGIN = "plugin"
    INLINE = "inline"

    @classmethod
    def parse(cls, text: str | MoEMode) -> MoEMode:
        return choice(cls, text, "--moe mode")


@dataclass(frozen=True, order=True)
class ComputeCapability:
    major: int
    minor: int

    @classmethod
    def parse(cls, text: str | ComputeCapability) -> ComputeCapability:
        """'8.9', '89', 'sm89', 'SM_120' -> ComputeCapability."""
        if isinstance(text, ComputeCapability):
            return text
        raw = str(text).strip().lower().removeprefix("sm").removeprefix("_")
        try:
            if "." in raw:
                major, minor = (int(part) for part in raw.split("."))
            else:
                major, minor = int(raw[:-1]), int(raw[-1])
        except ValueError as exc:
            raise UsageError(f"invalid compute capability '{text}'",
                             expected="MAJOR.MINOR, e.g. 8.9 (Ada) or 12.0 (Blackwell)",
                             found=repr(text)) from exc
        if major <= 0 or not 0 <= minor <= 9:
            raise UsageError(f"invalid compute capability '{text}'", expected="e.g. 8.0, 8.9, 9.0")
        return cls(major, minor)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def sm(self) -> str:
        """'SM89': the spelling of tensorrt_rtx.ComputeCapability members."""
        return f"SM{self.major}{self.minor}"


@dataclass(frozen=True)
class Limits:
    """The engine's shape envelope: batch rows, tokens one call feeds (max_step_tokens: a prompt
    or prompt chunk, the seq axis), and the total context (past + new) a sequence may reach
    (max_context, the same name the runtime uses for it)."""

    max_batch: int = 1
    max_step_tokens: int = 256
    max_context: int = 1024

    def validate(self, max_positions: int | None = None) -> Limits:
        for name in ("max_batch", "max_step_tokens", "max_context"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer",
                                 found=repr(value))
        if self.max_step_tokens > self.max_context:
            raise UsageError("--max-step-tokens exceeds --max-context",
                             expected="new tokens per call <= total context",
                             found=f"max_step_tokens {self.max_step_tokens} > "
                                   f"max_context {self.max_context}")
        if self.max_context < 2:
            raise UsageError("--max-context must be at least 2 (a prompt token and one decode step)",
                             found=str(self.max_context))
        if max_positions is not None and self.max_context > max_positions:
            raise UsageError("--max-context exceeds the model's max_position_embeddings",
                             expected=f"<= {max_positions}", found=str(self.max_context))
        return self


@dataclass(frozen=True)
class BuildOptions:
    backend: EngineBackend = EngineBackend.TENSORRT_RTX
    moe: MoEMode = MoEMode.PLUGIN
    compute_capability: ComputeCapability | None = None   # None: the local GPU's
    limits: Limits = Limits()
    opt_level: int = 3
    timing_cache: Path | None = None

    def validate(self) -> BuildOptions:
        if not isinstance(self.backend, EngineBackend) or not isinstance(self.moe, MoEMode):
            raise UsageError("backend and moe must be EngineBackend and MoEMode values",
                             found=f"{self.backend!r}, {self.moe!r}")
        if not isinstance(self.opt_level, int) or not 0 <= self.opt_level <= MAX_OPT_LEVEL:
            raise UsageError("--opt-level is out of range", expected=f"0 .. {MAX_OPT_LEVEL}",
                             found=repr(self.opt_level))
        if self.timing_cache is not None and Path(self.timing_cache).is_dir():
            raise UsageError(f"--timing-cache is a directory: {self.timing_cache}",
                             expected="a file path (created if missing)")
        self.limits.validate()
        return self

    @classmethod
    def parse(cls, backend: str = "tensorrt-rtx", moe: str = "plugin",
              compute_capability: str | None = None, max_batch: int = 1, max_step_tokens: int = 256,
              max_context: int = 1024, opt_level: int = 3,
              timing_cache: str | Path | None = None) -> BuildOptions:
        """Options from plain values (the CLI's strings); raises UsageError."""
        return cls(backend=EngineBackend.parse(backend), moe=MoEMode.parse(moe),
                   compute_capability=(None if compute_capability in (None, "")
                                       else ComputeCapability.parse(compute_capability)),
                   limits=Limits(max_batch, max_step_tokens, max_context), opt_level=opt_level,
                   timing_cache=Path(timing_cache) if timing_cache else None).validate()
