"""The build process: parse the prepared graph, configure, build, stream the plan to disk.

Run as `python -m mixbuild.builder.worker REQUEST.json` by mixbuild.builder.build, never by hand.
A separate process because (1) a TensorRT abort (std::terminate, heap corruption after a failed
plugin build) must not take the caller down, (2) plugin creators are process-global, so a
plugin build and an inline build never see each other's registry, and (3) TensorRT-RTX needs
an environment prepared before it loads (adapter.worker_env).

Protocol: the request names every path. Progress events go to stdout as JSON lines (the real
stdout is kept for them; fd 1 is pointed at stderr so native writes land in the log). On success
the result JSON is written and the exit code is 0; on a MixbuildError the error JSON and exit
code 2; anything else is a crash the caller reports with the log tail.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mixbuild.errors import MixbuildError, UsageError

DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64",
               "INT32": "int32", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool",
               "FP8": "float8_e4m3fn", "INT4": "int4", "FP4": "float4_e2m1fn", "E8M0": "float8_e8m0fnu"}


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    emit = _event_channel()
    try:
        result = build(request, emit)
    except MixbuildError as exc:
        Path(request["error"]).write_text(json.dumps(
            {"class": type(exc).__name__, "what": exc.what, "expected": exc.expected,
             "found": exc.found, "hint": exc.hint}))
        return 2
    Path(request["result"]).write_text(json.dumps(result))
    return 0


def _event_channel() -> Callable[[dict], None]:
    """A thread-safe JSON-lines writer on the original stdout; fd 1 then goes to stderr."""
    sys.stdout.flush()
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    lock = threading.Lock()

    def emit(event: dict) -> None:
        with lock:
            stream.write(json.dumps(event) + "\n")

    return emit


def build(request: dict, emit: Callable[[dict], None]) -> dict:
    from mixbuild.builder.adapter import Adapter
    from mixbuild.builder.options import ComputeCapability
    from mixbuild.contract import EngineBackend

    adapter = Adapter.load(EngineBackend.parse(request["backend"]))
    trt = adapter.trt
    if request["moe"] == "plugin":
        from mixbuild.plugins.trt_plugins import register_plugins

        register_plugins(adapter.backend)
    emit({"event": "stage", "name": "parsing the ONNX graph"})
    logger = adapter.logger(request.get("verbose", False))
    builder, network, parser = adapter.network(logger)
    start = time.perf_counter()
    _parse(parser, Path(request["graph"]).read_bytes(), request["onnx"], adapter.backend.label)
    parse_s = time.perf_counter() - start

    config = builder.create_builder_config()
    adapter.set_target(config, ComputeCapability.parse(request["compute_capability"]))
    config.builder_optimization_level = int(request["opt_level"])
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    monitor = adapter.progress_monitor(emit) if request.get("progress") else None
    if monitor is not None:
        config.progress_monitor = monitor
    _add_profiles(builder, config, request["profiles"])
    cache = _attach_timing_cache(config, request.get("timing_cache"))

    emit({"event": "stage", "name": "building the engine"})
    start = time.perf_counter()
    digest, size = _build_to_file(trt, builder, network, config, Path(request["plan"]))
    build_s = time.perf_counter() - start
    cache_report = _save_timing_cache(cache, request.get("timing_cache"))
    return {"parse_s": round(parse_s, 3), "build_s": round(build_s, 3),
            "plan_sha256": digest, "plan_bytes": size,
            "strongly_typed": _strongly_typed(trt, network),
            "inputs": _io(network, network.num_inputs, network.get_input),
            "outputs": _io(network, network.num_outputs, network.get_output),
            "layers": [describe_layer(trt, network.get_layer(i)) for i in range(network.num_layers)],
            "timing_cache": cache_report}


def _parse(parser, graph: bytes, onnx_path: str, label: str) -> None:
    """Parse the prepared graph; external data resolves beside `onnx_path`."""
    if parser.parse(graph, onnx_path):
        return
    errors = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        where = " ".join(filter(None, (error.node_name(), f"[{error.node_operator()}]"
                                       if error.node_operator() else "")))
        errors.append(f"{where}: {error.desc()}" if where else error.desc())
    raise UsageError(f"the {label} ONNX parser could not import the artifact",
                     found="; ".join(errors) or "no parser error recorded",
                     hint="see `mixbuild inspect ARTIFACT` for the ops; try the other --moe mode")


def _add_profiles(builder, config, profiles: list[dict]) -> None:
    for expected_index, spec in enumerate(profiles):
        profile = builder.create_optimization_profile()
        for name, shape in spec["shapes"].items():
            profile.set_shape(name, shape["min"], shape["opt"], shape["max"])
        index = config.add_optimization_profile(profile)
        if index != expected_index:
            raise UsageError(f"TensorRT rejected the '{spec['name']}' optimisation profile",
                             found=json.dumps(spec["dims"]))


def _build_to_file(trt, builder, network, config, path: Path) -> tuple[str, int]:
    """Build and write the plan, streamed when the builder can stream; (sha256, bytes)."""
    digest, written = hashlib.sha256(), 0
    with path.open("wb") as fh:
        def write(data) -> int:
            nonlocal written
            view = memoryview(data)
            fh.write(view)
            digest.update(view)
            written += view.nbytes
            return view.nbytes

        if hasattr(builder, "build_serialized_network_to_stream"):
            ok = builder.build_serialized_network_to_stream(network, config, _writer(trt, write))
        else:
            plan = builder.build_serialized_network(network, config)
            ok = plan is not None and write(plan) >= 0
    if not ok or written == 0:
        raise UsageError("TensorRT could not build the engine",
                         hint="the builder's log above says why; rebuild with verbose logging")
    return digest.hexdigest(), written


def _writer(trt, write: Callable):
    class PlanWriter(trt.IStreamWriter):
        def __init__(self):
            trt.IStreamWriter.__init__(self)

        def write(self, data, *_size):
            return write(data)

    return PlanWriter()


def _attach_timing_cache(config, path: str | None):
    if path is None:
        return None
    from mixbuild.builder.timing_cache import attach

    return attach(config, Path(path))


def _save_timing_cache(cache, path: str | None) -> dict | None:
    if cache is None:
        return None
    from mixbuild.builder.timing_cache import save

    return save(cache, Path(path))


def _strongly_typed(trt, network) -> bool:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return bool(network.get_flag(flag)) if flag is not None else True


def _io(network, count: int, get) -> list[dict]:
    tensors = [get(i) for i in range(count)]
    return [{"name": t.name, "dtype": DTYPE_NAMES.get(t.dtype.name, t.dtype.name.lower()),
             "shape": [int(d) for d in t.shape]} for t in tensors]


def describe_layer(trt, layer) -> dict:
    """{name, type[, plugin]} of a network layer; plugin layers name their creator."""
    entry = {"name": layer.name, "type": layer.type.name}
    if layer.type == trt.LayerType.PLUGIN_V3:
        layer.__class__ = trt.IPluginV3Layer     # get_layer() returns the ILayer base
        core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
        entry["plugin"] = {"name": core.plugin_name, "namespace": core.plugin_namespace,
                           "version": core.plugin_version}
    return entry


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
