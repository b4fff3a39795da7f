"""mixbuild's generation runtime: backends behind one Runner contract, KV cache, sampling,
streaming and batching.

    import mixbuild.runtime as rt
    model = rt.load("artifact-dir")                       # backend="auto": ort / torch / trt
    print(model.generate("def fib(n):", max_new_tokens=32)[0].text)

Importing this package is light: the names below load their modules (and numpy, ONNX Runtime,
torch, TensorRT) only when first used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load": "mixbuild.runtime.api",
    "Model": "mixbuild.runtime.api",
    "TextStream": "mixbuild.runtime.api",
    "LoadOptions": "mixbuild.runtime.api",
    "Backend": "mixbuild.contract",
    "Device": "mixbuild.contract",
    "Result": "mixbuild.runtime.generate",
    "Timings": "mixbuild.runtime.generate",
    "FinishReason": "mixbuild.runtime.generate",
    "SamplingParams": "mixbuild.runtime.sampling",
    "GenerationDefaults": "mixbuild.runtime.sampling",
    "Tokenizer": "mixbuild.runtime.tokenizer",
    "IncrementalDetokenizer": "mixbuild.runtime.tokenizer",
    "cli_run": "mixbuild.runtime.cli",
}

__all__ = [
    "Backend",
    "Device",
    "FinishReason",
    "GenerationDefaults",
    "IncrementalDetokenizer",
    "LoadOptions",
    "Model",
    "Result",
    "SamplingParams",
    "TextStream",
    "Timings",
    "Tokenizer",
    "cli_run",
    "load",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mixbuild.runtime' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
