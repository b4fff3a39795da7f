"""`mixbuild engine`: an artifact directory in, an engine directory (engine.plan + engine.json) out.

    1. preflight (nothing written yet): options, destination, artifact hashes, backend import,
       compute capability, precision floors, the ops the parser will meet in this MoE mode
    2. the prepared graph (graph.py) and the request go to a scratch directory
    3. a build process (worker.py) parses, builds and streams engine.plan into the atomic
       output directory, reporting progress events
    4. the plugin mapping is checked, engine.json written, and the directory renamed into place
"""

from __future__ import annotations

import collections
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mixbuild import __version__
from mixbuild.builder.options import BuildOptions, ComputeCapability, MoEMode
from mixbuild.contract import ENGINE_KIND, Layout
from mixbuild.errors import ArtifactError, MixbuildError, UsageError

LOG_TAIL_LINES = 25
# builder failures seen here, by a line of their log -> what to do instead
KNOWN_FAILURES = {
    "Graph contains more than one op named":
        "TensorRT-RTX 1.7's Myelin compiler fails this way on serving-layout artifacts built with "
        "--max-batch 1 and --max-step-tokens below 64: pass --max-batch 2 or more, or "
        "--max-step-tokens 64 or more",
    "Attention operation was not supported by a dedicated kernel":
        "TensorRT's attention kernels take fp16 or bf16: export the artifact with --dtype fp16 "
        "(or bf16) for an engine",
}


class EngineBuildError(MixbuildError):
    """TensorRT failed or crashed while building (the build process exited abnormally)."""


def build_engine(artifact_dir: str | Path, out_dir: str | Path, backend: str = "tensorrt-rtx",
                 compute_capability: str | None = None, moe: str = "plugin", max_batch: int = 1,
                 max_step_tokens: int = 256, max_context: int = 1024, opt_level: int = 3,
                 timing_cache: str | Path | None = None, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Build a TensorRT / TensorRT-RTX engine from an exported artifact; returns the engine dir.

    Raises UsageError for impossible combinations before anything is written (FP8 below SM 8.9,
    a compute capability the backend cannot target, ops the backend cannot import in this MoE
    mode, an existing output without overwrite), MissingDependencyError naming the extra.
    """
    options = BuildOptions.parse(backend=backend, moe=moe, compute_capability=compute_capability,
                                 max_batch=max_batch, max_step_tokens=max_step_tokens,
                                 max_context=max_context,
                                 opt_level=opt_level, timing_cache=timing_cache)
    return build(artifact_dir, out_dir, options, overwrite=overwrite, progress=progress)


@dataclass(frozen=True)
class Preflight:
    artifact: object                   # mixbuild.exporter.artifact.Artifact
    adapter: object                    # mixbuild.builder.adapter.Adapter
    target: ComputeCapability
    graph: object                      # mixbuild.builder.graph.PreparedGraph
    inputs: dict                       # input name -> symbolic shape
    outputs: dict                      # output name -> symbolic shape
    profiles: list


def preflight(artifact_dir: str | Path, out: Path, options: BuildOptions,
              overwrite: bool) -> Preflight:
    """Every check that can refuse the build, in order of cost; writes nothing."""
    from mixbuild.atomic import check_destination
    from mixbuild.builder import checks, graph, profiles
    from mixbuild.builder.adapter import Adapter
    from mixbuild.exporter.artifact import Artifact

    options.validate()
    check_destination(out, overwrite, ENGINE_KIND, _inputs(artifact_dir, options))
    artifact = Artifact.open(artifact_dir)
    options.limits.validate(artifact.spec.max_position_embeddings)
    adapter = Adapter.load(options.backend)
    target = checks.resolve_target(adapter, options.compute_capability)
    checks.check_precision(adapter, artifact, target)
    model = graph.load_graph(artifact.onnx_path)
    inputs, outputs = profiles.input_dims(model), _output_dims(model)
    serving = artifact.layout is Layout.SERVING
    prepared = graph.prepare(model, options.moe,
                             capacity=options.limits.max_context if serving else None)
    checks.check_ops(adapter, graph.parser_ops(prepared.model, options.moe), options.moe)
    return Preflight(artifact, adapter, target, prepared, inputs, outputs,
                     [p.to_dict(inputs) for p in profiles.make_profiles(options.limits)])


def build(artifact_dir: str | Path, out_dir: str | Path, options: BuildOptions,
          overwrite: bool = False, progress: bool = True) -> Path:
    from mixbuild.atomic import atomic_directory, scratch_directory
    from mixbuild.builder.manifest import write_engine_manifest
    from mixbuild.contract import PLAN_FILE

    start = time.perf_counter()
    out = Path(out_dir)
    pre = preflight(artifact_dir, out, options, overwrite)
    with scratch_directory(out) as scratch, \
            atomic_directory(out, ENGINE_KIND, overwrite, _inputs(artifact_dir, options)) as tmp:
        request = _request(pre, options, Path(scratch), tmp / PLAN_FILE, progress)
        result = run_worker(pre.adapter, request, Path(scratch), progress)
        _check_mapping(result["layers"], pre.graph, options.moe)
        result["wall_s"] = round(time.perf_counter() - start, 3)
        write_engine_manifest(tmp, engine_manifest(pre, options, result))
    return out


def _inputs(artifact_dir, options: BuildOptions) -> list:
    """What the build reads (the output must not be, or hold, any of it)."""
    return [artifact_dir] + ([options.timing_cache] if options.timing_cache else [])


def _request(pre: Preflight, options: BuildOptions, scratch: Path, plan_path: Path,
             progress: bool) -> dict:
    graph_path = scratch / "graph.onnx"
    graph_path.write_bytes(pre.graph.serialize())
    timing_cache = options.timing_cache if pre.adapter.timing_cache_supported else None
    return {"backend": options.backend.value, "moe": options.moe.value,
            "onnx": str(pre.artifact.onnx_path.resolve()), "graph": str(graph_path),
            "plan": str(plan_path), "result": str(scratch / "result.json"),
            "error": str(scratch / "error.json"), "compute_capability": str(pre.target),
            "opt_level": options.opt_level, "profiles": pre.profiles, "progress": progress,
            "timing_cache": str(timing_cache) if timing_cache else None}


def run_worker(adapter, request: dict, scratch: Path, progress: bool) -> dict:
    """Run the build process, relaying its progress events; returns its result dict."""
    from mixbuild.builder.view import build_view

    request_path = scratch / "request.json"
    request_path.write_text(json.dumps(request))
    log_path = scratch / "worker.log"
    env = adapter.worker_env(scratch)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with log_path.open("wb") as log, build_view(progress) as view:
        proc = subprocess.Popen([sys.executable, "-m", "mixbuild.builder.worker", str(request_path)],
                                stdout=subprocess.PIPE, stderr=log, env=env, text=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        stray = collections.deque(maxlen=LOG_TAIL_LINES)   # stdout lines that are not events
        try:
            for line in proc.stdout:
                event = _event(line)
                if event is None:
                    stray.append(line.rstrip("\n"))
                else:
                    view.handle(event)
            code = proc.wait()
        finally:
            if proc.poll() is None:             # interrupted: do not leave the build running
                proc.kill()
                proc.wait()
    if code == 0:
        return json.loads(Path(request["result"]).read_text())
    raise _worker_error(adapter, code, Path(request["error"]), log_path, list(stray))


def _die_with_parent() -> None:
    """In the build process (Linux): die when mixbuild does, even by SIGKILL, so that no orphan
    goes on writing a plan into an output directory the next run is cleaning up."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def _event(line: str) -> dict | None:
    """A progress event of the build process, or None for any other output on its stdout
    (a library printing there): kept for the error report, never dropped."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def _worker_error(adapter, code: int, error_path: Path, log_path: Path,
                  stray: list[str] = ()) -> MixbuildError:
    lines = log_path.read_text(errors="replace").splitlines() + [f"[stdout] {s}" for s in stray]
    tail = "\n".join(lines[-LOG_TAIL_LINES:])
    if error_path.is_file():
        error = json.loads(error_path.read_text())
        cls = {"UsageError": UsageError, "ArtifactError": ArtifactError}.get(error["class"],
                                                                             EngineBuildError)
        found = error["found"] or (tail or None)
        known = next((hint for line, hint in KNOWN_FAILURES.items() if line in "\n".join(lines)),
                     None)
        return cls(error["what"], expected=error["expected"], found=found,
                   hint=known or error["hint"])
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    return EngineBuildError(f"the {adapter.backend.label} build process crashed ({how})",
                            found=tail or "no output", hint="nothing was written; rerun with "
                            "--debug and report the log above")


def _check_mapping(layers: list[dict], prepared, mode: MoEMode) -> None:
    """Plugin mode: every MoE node became a mixbuild plugin layer; inline: none did."""
    from mixbuild.contract import PLUGIN_NAMESPACE

    found = sum(1 for layer in layers
                if (layer.get("plugin") or {}).get("namespace") == PLUGIN_NAMESPACE)
    wanted = sum(prepared.moe_nodes.values()) if mode is MoEMode.PLUGIN else 0
    if found != wanted:
        raise EngineBuildError(f"the parser mapped {found} MoE nodes to mixbuild plugins "
                               f"with --moe {mode.value}", expected=str(wanted), found=str(found))


def _output_dims(model) -> dict[str, list]:
    return {v.name: [d.dim_param or int(d.dim_value) for d in v.type.tensor_type.shape.dim]
            for v in model.graph.output}


def engine_manifest(pre: Preflight, options: BuildOptions, result: dict) -> dict:
    from mixbuild.builder.manifest import plugin_summary, with_dim_names
    from mixbuild.contract import MANIFEST_FILE, PLAN_FILE
    from mixbuild.exporter.manifest import sha256_file

    adapter, artifact = pre.adapter, pre.artifact
    recorded = {"precision": artifact.precision.value, "dtype": artifact.dtype.value}
    return {
        "backend": adapter.backend.value,
        "tensorrt": {"module": adapter.backend.module,
                     "version": adapter.version, "onnx_parser_version": adapter.parser_version},
        "compute_capability": str(pre.target), "moe": options.moe.value,
        **recorded, "spec": artifact.manifest.data["spec"],
        "limits": vars(options.limits), "profiles": pre.profiles,
        "layout": artifact.layout.value,
        "logits": "all" if artifact.all_logits else "last",
        "cache_capacity": (options.limits.max_context
                           if artifact.layout is Layout.SERVING else None),
        "inputs": with_dim_names(result["inputs"], pre.inputs),
        "outputs": with_dim_names(result["outputs"], pre.outputs), "io_source": "network",
        "plugins": plugin_summary(result["layers"]),
        "plugin_registration": (f"mixbuild.plugins.trt_plugins.register_plugins"
                                f"('{adapter.backend.value}')" if options.moe is MoEMode.PLUGIN
                                else None),
        "layers": {"source": "network", "count": len(result["layers"]), "items": result["layers"]},
        "builder": {"optimization_level": options.opt_level,
                    "strongly_typed": result["strongly_typed"], "profiling_verbosity": "DETAILED",
                    "graph_rewrites": pre.graph.rewrites,
                    "timing_cache": _timing_cache_report(adapter, options, result)},
        "source": {"artifact": str(artifact.path.resolve()),
                   "manifest_sha256": sha256_file(artifact.path / MANIFEST_FILE),
                   **recorded,
                   "producer": artifact.manifest.data.get("producer", {}).get("version")},
        "plan": {"file": PLAN_FILE, "sha256": result["plan_sha256"], "bytes": result["plan_bytes"]},
        "build": {"wall_s": result["wall_s"], "parse_s": result["parse_s"],
                  "build_s": result["build_s"], "mixbuild": __version__,
                  "python": platform.python_version(), "host": f"{platform.system()} "
                                                               f"{platform.machine()}"},
    }


def _timing_cache_report(adapter, options: BuildOptions, result: dict) -> dict | None:
    if options.timing_cache is None:
        return None
    if not adapter.timing_cache_supported:
        return {"path": str(options.timing_cache), "used": False,
                "reason": f"{adapter.backend.label} timing-cache operations are no-ops "
                          "(since TensorRT-RTX 1.2); the file was not read or written"}
    return {**result["timing_cache"], "used": True}
