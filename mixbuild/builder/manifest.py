"""engine.json: what an engine directory holds, for the runtime, `mixbuild inspect` and people.

    backend            "tensorrt" | "tensorrt-rtx" (mixbuild.contract.EngineBackend)
    tensorrt           module, version, ONNX parser version
    compute_capability the SM the plan was built for;  moe: "plugin" | "inline"
    spec, precision, dtype, source   the artifact it came from (manifest sha256 included)
    limits, profiles   the shape envelope; profiles[i] is optimisation profile i (select_profile)
    inputs, outputs    name, dtype, shape (-1 = dynamic), dims (the contract's dim names)
    plugins            the IPluginV3 creators the engine needs (register before deserializing)
    layers             the layer list and where it came from ("network": the network TensorRT
                       built, captured in the build process; "engine_inspector": the engine)
    builder, build     settings, graph rewrites, timing cache, wall times
    plan               file name, sha256, bytes
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from mixbuild.contract import ENGINE_FORMAT_VERSION, ENGINE_KIND, ENGINE_MANIFEST_FILE, PLAN_FILE
from mixbuild.errors import ArtifactError


def plugin_summary(layers: list[dict]) -> list[dict]:
    counts = Counter((p["name"], p["namespace"], p["version"])
                     for p in (layer.get("plugin") for layer in layers) if p)
    return [{"name": n, "namespace": ns, "version": v, "layers": c}
            for (n, ns, v), c in sorted(counts.items())]


def with_dim_names(tensors: list[dict], dims: dict[str, list]) -> list[dict]:
    """Add the ONNX symbolic dim names ("batch", "seq", ... or sizes) to each tensor entry."""
    return [{**t, "dims": dims.get(t["name"], t["shape"])} for t in tensors]


def write_engine_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    manifest = {"kind": ENGINE_KIND, "format_version": ENGINE_FORMAT_VERSION, **manifest}
    (directory / ENGINE_MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")


def read_engine_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / ENGINE_MANIFEST_FILE
    if not directory.is_dir():
        raise ArtifactError(f"engine directory not found: {directory}")
    if not path.is_file() or not (directory / PLAN_FILE).is_file():
        raise ArtifactError(f"{directory} is not a mixbuild engine directory",
                            expected=f"{PLAN_FILE} and {ENGINE_MANIFEST_FILE}",
                            hint="build one with `mixbuild engine ARTIFACT -o DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt engine manifest", found=str(exc)[:200],
                            hint="build the engine again") from exc
    if manifest.get("kind") != ENGINE_KIND or manifest.get("format_version") != ENGINE_FORMAT_VERSION:
        raise ArtifactError(f"{path}: not an engine manifest of a known format",
                            expected=f"kind '{ENGINE_KIND}', format_version {ENGINE_FORMAT_VERSION}",
                            found=f"kind {manifest.get('kind')!r}, "
                                  f"format_version {manifest.get('format_version')!r}")
    return manifest
