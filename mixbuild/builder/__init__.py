"""TensorRT / TensorRT-RTX engines from exported artifacts, with mixbuild's MoE plugins.

    options     BuildOptions (EngineBackend, MoEMode, ComputeCapability, Limits) with validate()
    adapter     the one place that imports tensorrt / tensorrt_rtx and hides their differences
    graph       the parser's view of the artifact for --moe plugin | inline (weights untouched)
    profiles    prefill / decode optimisation profiles; select_profile for the runtime
    checks      refusals before anything is built (compute capability, precision, ops)
    build       build_engine(): preflight, build process, engine.json, atomic output
    worker      the build process (parse, configure, build, stream the plan)
    manifest    engine.json;  inspect: inspect_engine / render_engine;  cli: engine_command

Nothing here imports TensorRT at import time.
"""

from mixbuild.builder.build import build_engine

__all__ = ["build_engine"]
