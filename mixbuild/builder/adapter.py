"""One adapter over `tensorrt` and `tensorrt_rtx`, imported lazily, hiding their differences.

                          tensorrt (full)                    tensorrt_rtx
    compute capability    the local GPU's only               chosen ahead of time:
                                                             IBuilderConfig.set_compute_capability
                                                             (ComputeCapability.SM75 .. SM121), no GPU
    strongly typed        NetworkDefinitionCreationFlag      always (the flag is deprecated, ignored)
                          .STRONGLY_TYPED
    timing cache          loaded / saved                     no-op since TensorRT-RTX 1.2: not used
    ONNX NonZero          a native layer                     no implementation (the parser asks for a
                                                             'NonZero' plugin that is not shipped)
    Python plugins        parser calls into libnvinfer       the parser dlopen()s the unversioned
                                                             'libtensorrt_rtx.so' (getPrivateApi_INTERNAL)
                                                             when it adds a plugin layer; the wheel ships
                                                             only libtensorrt_rtx.so.1, so the build
                                                             process gets an alias on LD_LIBRARY_PATH

Everything else (Builder, OnnxParser, optimisation profiles, IProgressMonitor, builder
optimisation level, ProfilingVerbosity) is the same API in both modules.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mixbuild.builder.options import ComputeCapability
from mixbuild.contract import EngineBackend
from mixbuild.errors import MissingDependencyError, UsageError

PURPOSE = "building TensorRT engines"

# Ops a parser claims to support (supports_operator may give false positives) but cannot import.
KNOWN_GAPS = {
    EngineBackend.TENSORRT_RTX: {
        "NonZero": "TensorRT-RTX has no NonZero implementation: its ONNX parser imports NonZero as "
                   "a 'NonZero' plugin that TensorRT-RTX does not ship (NVIDIA/TensorRT-RTX#36)",
    },
}


@dataclass(frozen=True)
class Adapter:
    backend: EngineBackend
    trt: object                 # the imported module

    @classmethod
    def load(cls, backend: EngineBackend) -> Adapter:
        try:
            module = importlib.import_module(backend.module)
        except ImportError as exc:
            raise MissingDependencyError(backend.module, backend.extra, PURPOSE) from exc
        return cls(backend, module)

    # ------------------------------------------------------------------ identity
    @property
    def version(self) -> str:
        return str(self.trt.__version__)

    @property
    def parser_version(self) -> int | None:
        getter = getattr(self.trt, "get_nv_onnx_parser_version", None)
        return int(getter()) if getter else None

    @property
    def ahead_of_time(self) -> bool:
        """True when the builder targets a chosen compute capability without a GPU."""
        return self.backend is EngineBackend.TENSORRT_RTX

    @property
    def timing_cache_supported(self) -> bool:
        return self.backend is EngineBackend.TENSORRT

    # ------------------------------------------------------------------ targets
    def targets(self) -> list[ComputeCapability]:
        """Compute capabilities this backend can build for on this machine."""
        if self.ahead_of_time:
            names = [n for n in self.trt.ComputeCapability.__members__ if n.startswith("SM")]
            return sorted(ComputeCapability.parse(n) for n in names)
        local = local_compute_capability()
        return [local] if local else []

    def config_flags(self) -> int:
        """NetworkDefinitionCreationFlag bits: strongly typed where it is a flag."""
        if self.backend is EngineBackend.TENSORRT_RTX:
            return 0                           # always strongly typed; the flag is ignored
        flag = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 1 << int(flag) if flag is not None else 0

    def set_target(self, config, cc: ComputeCapability) -> None:
        if not self.ahead_of_time:
            return                              # full TensorRT builds for the GPU it runs on
        config.num_compute_capabilities = 1
        if not config.set_compute_capability(getattr(self.trt.ComputeCapability, cc.sm), 0):
            raise UsageError(f"{self.backend.label} refused compute capability {cc}")

    # ------------------------------------------------------------------ objects
    def logger(self, verbose: bool = False):
        trt = self.trt
        return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)

    def network(self, logger):
        """(builder, network, parser) for a strongly typed network."""
        builder = self.trt.Builder(logger)
        network = builder.create_network(self.config_flags())
        return builder, network, self.trt.OnnxParser(network, logger)

    def op_gaps(self, ops: dict[str, str]) -> dict[str, str]:
        """{op: why it cannot be imported} for the ops of `ops` (op -> where it occurs)."""
        known = KNOWN_GAPS.get(self.backend, {})
        gaps = {op: f"{known[op]} (in {where})" for op, where in ops.items() if op in known}
        _, _, parser = self.network(self.logger())
        for op, where in ops.items():
            if op not in gaps and not parser.supports_operator(op):
                gaps[op] = (f"the {self.backend.label} {self.version} ONNX parser has no importer "
                            f"for it (in {where})")
        return gaps

    def progress_monitor(self, emit: Callable[[dict], None]):
        """An IProgressMonitor that reports build phases to `emit`, or None without one."""
        if not hasattr(self.trt, "IProgressMonitor"):
            return None
        return _monitor_class(self.trt)(emit)

    # ------------------------------------------------------------------ build process
    def worker_env(self, scratch: Path) -> dict[str, str]:
        """Environment for the build process (see the module docstring on libtensorrt_rtx.so)."""
        env = dict(os.environ)
        if self.backend is not EngineBackend.TENSORRT_RTX or not sys.platform.startswith("linux"):
            return env
        alias = _rtx_library_alias(scratch)
        if alias is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (str(alias), env.get("LD_LIBRARY_PATH", "")) if p)
        return env


def local_compute_capability() -> ComputeCapability | None:
    """The first visible CUDA GPU's compute capability, or None on a CPU-only machine."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
    except (ImportError, RuntimeError, AssertionError):
        return None
    return ComputeCapability(major, minor)


def _rtx_library_alias(scratch: Path) -> Path | None:
    """A directory holding libtensorrt_rtx.so -> the installed libtensorrt_rtx.so.N, or None
    when the unversioned name already resolves beside the parser (an SDK install)."""
    try:
        libs = Path(importlib.import_module("tensorrt_rtx_libs").__file__).parent
    except ImportError:
        return None
    if (libs / "libtensorrt_rtx.so").exists():
        return None
    versioned = sorted(libs.glob("libtensorrt_rtx.so.*"))
    if not versioned:
        return None
    alias = scratch / "lib"
    alias.mkdir(parents=True, exist_ok=True)
    link = alias / "libtensorrt_rtx.so"
    if not link.exists():
        link.symlink_to(versioned[0])
    return alias


@functools.cache
def _monitor_class(trt):
    class BuildMonitor(trt.IProgressMonitor):
        """Forwards TensorRT's build phases as events (called from builder threads)."""

        def __init__(self, emit):
            trt.IProgressMonitor.__init__(self)
            self.emit = emit

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.emit({"event": "phase_start", "phase": phase_name, "parent": parent_phase,
                       "steps": int(num_steps)})

        def step_complete(self, phase_name, step):
            self.emit({"event": "step", "phase": phase_name, "step": int(step)})
            return True                         # False would cancel the build

        def phase_finish(self, phase_name):
            self.emit({"event": "phase_finish", "phase": phase_name})

    return BuildMonitor
