"""What `mixbuild inspect ENGINE_DIR` reports: engine.json checked against the plan, and layers.

The layers come from TensorRT's engine inspector (the built engine, after fusion; the plan was
built with ProfilingVerbosity.DETAILED) when the plan can be deserialized here: its backend is
installed and a GPU of the plan's compute capability is present. Otherwise (e.g. a TensorRT-RTX
plan compiled ahead of time on a CPU machine, where deserializing needs CUDA) they come from
engine.json: the network TensorRT built, captured by the build process. `layers.source` says
which, and `layers.note` why.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixbuild.builder.manifest import EngineManifest, read_engine_manifest, verify_plan
from mixbuild.contract import MOE_OPS, PLUGIN_NAMESPACE

if TYPE_CHECKING:  # pragma: no cover
    from rich.table import Table


def inspect_engine(path: str | Path) -> dict[str, Any]:
    """Verify engine.json and the plan's sha256 against it, and describe the engine."""
    directory = Path(path)
    manifest = read_engine_manifest(directory)
    plan = verify_plan(directory, manifest)
    items, source, note = _layers(manifest, plan)
    items = [{**item, "moe_plugin": is_moe_plugin(item)} for item in items]
    data = manifest.data   # reported as written
    return {
        "kind": "engine", "path": str(directory), "backend": manifest.backend.value,
        "version": manifest.version, "compute_capability": manifest.compute_capability,
        "moe": manifest.moe, "precision": manifest.precision.value, "dtype": manifest.dtype.value,
        "plan": {**data["plan"], "verified": True}, "source": data["source"],
        "inputs": manifest.inputs, "outputs": manifest.outputs,
        "limits": manifest.limits, "profiles": manifest.profiles,
        "plugins": manifest.plugins, "builder": data["builder"], "build": data["build"],
        "layers": {"source": source, "note": note, "count": len(items),
                   "moe_plugin_layers": sum(item["moe_plugin"] for item in items),
                   "types": dict(Counter(item["type"] for item in items).most_common()),
                   "items": items},
    }


def is_moe_plugin(layer: dict) -> bool:
    plugin = layer.get("plugin")
    if plugin:
        return plugin.get("namespace") == PLUGIN_NAMESPACE and plugin.get("name") in MOE_OPS
    return "plugin" in layer.get("type", "").lower() and any(op in layer.get("name", "")
                                                             for op in MOE_OPS)


def _layers(manifest: EngineManifest, plan: Path) -> tuple[list[dict], str, str]:
    recorded = manifest.layers
    try:
        items = _inspector_layers(manifest, plan)
    except _Unavailable as why:
        return recorded, "network", str(why)
    return items, "engine_inspector", "deserialized here; layers after TensorRT's fusions"


class _Unavailable(Exception):
    """Why the plan cannot be deserialized on this machine."""


def _inspector_layers(manifest: EngineManifest, plan: Path) -> list[dict]:
    import importlib

    from mixbuild.builder.adapter import local_compute_capability
    from mixbuild.builder.options import ComputeCapability

    module = manifest.module
    try:
        trt = importlib.import_module(module)
    except ImportError as exc:
        raise _Unavailable(f"{module} is not installed here; layers as captured at build time") from exc
    local = local_compute_capability()
    wanted = ComputeCapability.parse(manifest.compute_capability)
    if local != wanted:
        raise _Unavailable(f"the plan targets compute capability {wanted} and this machine has "
                           f"{'no CUDA GPU' if local is None else local}; layers as captured at "
                           "build time (the network TensorRT built)")
    if manifest.plugin_registration:
        from mixbuild.plugins.trt_plugins import register_plugins

        register_plugins(manifest.backend)
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise _Unavailable(f"{module} {trt.__version__} could not deserialize the plan here")
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return [_inspector_layer(layer) for layer in info.get("Layers", [])]


def _inspector_layer(layer) -> dict:
    if isinstance(layer, str):                      # LAYER_NAMES_ONLY verbosity
        return {"name": layer, "type": "unknown"}
    entry = {"name": layer.get("Name", ""), "type": layer.get("LayerType", "unknown")}
    if layer.get("TacticName"):
        entry["tactic"] = layer["TacticName"]
    return entry


def render_engine(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from mixbuild.progress import human_bytes

    console = Console()
    console.print(f"[bold]mixbuild engine[/] {report['path']}  {report['backend']} "
                  f"{report['version']}, SM {report['compute_capability']}, precision "
                  f"[bold]{report['precision']}[/], --moe {report['moe']}")
    plan, build = report["plan"], report["build"]
    console.print(f"plan {human_bytes(plan['bytes'])}, sha256 {plan['sha256'][:16]}... verified; "
                  f"built in {build['wall_s']:.1f} s (parse {build['parse_s']:.2f} s, builder "
                  f"{build['build_s']:.2f} s, optimisation level "
                  f"{report['builder']['optimization_level']})")
    console.print(f"source artifact {report['source']['artifact']} (mixbuild.json sha256 "
                  f"{report['source']['manifest_sha256'][:16]}...)")
    console.print(_io_table(report))
    console.print(_profile_table(report))
    if report["plugins"]:
        plugins = Table("plugin", "namespace", "version", "layers", title="plugins the engine needs")
        for p in report["plugins"]:
            plugins.add_row(p["name"], p["namespace"], p["version"], str(p["layers"]))
        console.print(plugins)
    layers = report["layers"]
    types = ", ".join(f"{t} {n}" for t, n in layers["types"].items())
    console.print(f"[bold]{layers['count']} layers[/] ({layers['source']}: {layers['note']}); "
                  f"MoE plugin layers: {layers['moe_plugin_layers']}\n  {types}")
    for item in layers["items"]:
        if item["moe_plugin"]:
            console.print(f"  [green]MoE plugin[/] {item['name']}")


def _io_table(report: dict) -> Table:
    from rich.table import Table

    table = Table("", "name", "dtype", "dims", title="I/O tensors")
    for kind in ("inputs", "outputs"):
        tensors = report[kind]
        shown = tensors if len(tensors) <= 8 else tensors[:5]
        for t in shown:
            table.add_row(kind[:-1], t["name"], t["dtype"], " x ".join(map(str, t["dims"])))
        if len(shown) < len(tensors):
            table.add_row(kind[:-1], f"... {len(tensors) - len(shown)} more", "", "")
    return table


def _profile_table(report: dict) -> Table:
    from rich.table import Table

    table = Table("profile", *report["profiles"][0]["dims"], title="optimisation profiles (min / opt / max)")
    for index, profile in enumerate(report["profiles"]):
        table.add_row(f"{index} {profile['name']}",
                      *(" / ".join(map(str, r)) for r in profile["dims"].values()))
    return table
