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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixbuild.contract import (
    ENGINE_FORMAT_VERSION,
    ENGINE_KIND,
    ENGINE_MANIFEST_FILE,
    PLAN_FILE,
    DType,
    EngineBackend,
    Layout,
    Precision,
)
from mixbuild.errors import ArtifactError, UsageError
from mixbuild.exporter.manifest import field, mismatch, recorded_layout, spec_of
from mixbuild.jsonfile import json_type, read_json_object
from mixbuild.model.spec import MixtralSpec


@dataclass(frozen=True)
class EngineManifest:
    """engine.json, parsed and checked once (`read_engine_manifest`): its fields as their
    types. `data` is the JSON object as written, for reports; code reads the attributes."""

    data: dict[str, Any]
    backend: EngineBackend
    module: str                   # the TensorRT Python module that built it
    version: str
    compute_capability: str
    moe: str                      # "plugin" | "inline"
    precision: Precision
    dtype: DType
    spec: MixtralSpec
    layout: Layout
    all_logits: bool
    cache_capacity: int | None    # the serving layout's fixed cache positions
    limits: dict[str, int]        # max_batch, max_step_tokens, max_context
    profiles: list[dict[str, Any]]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    plugins: list[dict[str, Any]]
    plugin_registration: str | None
    layers: list[dict[str, Any]]  # as captured at build time
    timing_cache: dict[str, Any] | None
    plan_bytes: int
    plan_sha256: str
    wall_s: float


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


def read_engine_manifest(directory: str | Path) -> EngineManifest:
    """engine.json, checked: format, every field with its type, the I/O against the contract
    for the recorded spec, and precision / dtype / spec against the source artifact's manifest
    when that artifact is still there, unchanged (ArtifactError naming the field otherwise).
    The plan itself is checked by `verify_plan`."""
    directory = Path(directory)
    path = directory / ENGINE_MANIFEST_FILE
    if not directory.is_dir():
        raise ArtifactError(f"engine directory not found: {directory}")
    if not path.is_file() or not (directory / PLAN_FILE).is_file():
        raise ArtifactError(f"{directory} is not a mixbuild engine directory",
                            expected=f"{PLAN_FILE} and {ENGINE_MANIFEST_FILE}",
                            hint="build one with `mixbuild engine ARTIFACT -o DIR`")
    manifest = read_json_object(path, ArtifactError, "engine manifest", _HINT)
    if manifest.get("kind") != ENGINE_KIND or manifest.get("format_version") != ENGINE_FORMAT_VERSION \
            or type(manifest.get("format_version")) is not int:
        raise ArtifactError(f"{path}: not an engine manifest of a known format",
                            expected=f"kind '{ENGINE_KIND}', format_version {ENGINE_FORMAT_VERSION}",
                            found=f"kind {manifest.get('kind')!r}, "
                                  f"format_version {manifest.get('format_version')!r}")
    return check_engine_manifest(manifest, path)


def verify_plan(directory: str | Path, manifest: EngineManifest) -> Path:
    """engine.plan has the size and sha256 engine.json records (checked before anything
    deserializes it); returns its path."""
    from mixbuild.exporter.manifest import sha256_file

    plan = Path(directory) / PLAN_FILE
    if plan.stat().st_size != manifest.plan_bytes or sha256_file(plan) != manifest.plan_sha256:
        raise ArtifactError(f"engine plan is corrupt (size or sha256 differs from engine.json): {plan}",
                            expected=f"{manifest.plan_bytes} bytes, sha256 "
                                     f"{manifest.plan_sha256[:16]}...",
                            found=f"{plan.stat().st_size} bytes",
                            hint="build the engine again")
    return plan


_HINT = "engine.json was edited or damaged; build the engine again"


def check_engine_manifest(manifest: dict[str, Any], path: Path) -> EngineManifest:
    """Every field `write_engine_manifest` writes, with its type, and the fields that can be
    checked without TensorRT consistent with each other and with the source artifact."""
    from mixbuild.builder.options import ComputeCapability

    def need(obj, key, kind, where="", **kw):
        return field(obj, key, kind, path, where, hint=_HINT, **kw)

    backend = EngineBackend(need(manifest, "backend", "string",
                                 choices=tuple(b.value for b in EngineBackend)))
    trt = need(manifest, "tensorrt", "object")
    module = need(trt, "module", "string", "tensorrt", choices=(backend.module,))
    version = need(trt, "version", "string", "tensorrt")
    cc = need(manifest, "compute_capability", "string")
    try:
        ComputeCapability.parse(cc)
    except UsageError as exc:
        raise ArtifactError(f"{path}: field 'compute_capability': {exc.what}", expected=exc.expected,
                            found=exc.found, hint=_HINT) from None
    moe = need(manifest, "moe", "string", choices=("plugin", "inline"))
    precision = Precision(need(manifest, "precision", "string",
                               choices=tuple(p.value for p in Precision)))
    dtype = DType(need(manifest, "dtype", "string", choices=tuple(d.value for d in DType)))
    if not precision.quantized and precision is not Precision.of_dtype(dtype):
        raise mismatch(path, "precision", f"{Precision.of_dtype(dtype).value} (a float engine's "
                       f"precision is its dtype, {dtype.value})", precision.value, hint=_HINT)
    spec = spec_of(need(manifest, "spec", "object"), path, hint=_HINT)
    limits = need(manifest, "limits", "object")
    for key in ("max_batch", "max_step_tokens", "max_context"):
        if need(limits, key, "integer", "limits") <= 0:
            raise mismatch(path, f"limits.{key}", "a positive integer", limits[key], hint=_HINT)
    profiles = need(manifest, "profiles", "array")
    if not profiles:
        raise mismatch(path, "profiles", "at least one optimisation profile", profiles, hint=_HINT)
    for index, profile in enumerate(profiles):
        where = f"profiles[{index}]"
        _object(profile, where, path)
        need(profile, "name", "string", where)
        for dim, sizes in need(profile, "dims", "object", where).items():
            _ints(sizes, f"{where}.dims.{dim}", path, length=3)
        for name, ranges in need(profile, "shapes", "object", where).items():
            _object(ranges, f"{where}.shapes.{name}", path)
            for key in ("min", "opt", "max"):
                _ints(need(ranges, key, "array", f"{where}.shapes.{name}"),
                      f"{where}.shapes.{name}.{key}", path)
    debug = False
    for key in ("inputs", "outputs"):
        for index, entry in enumerate(need(manifest, key, "array")):
            where = f"{key}[{index}]"
            _object(entry, where, path)
            need(entry, "name", "string", where)
            need(entry, "dtype", "string", where)
            need(entry, "shape", "array", where)
            need(entry, "dims", "array", where)
            debug = debug or entry["name"].startswith("debug.")
    layout, all_logits = recorded_layout(manifest, path, _HINT)
    _check_io(manifest, path, spec, dtype, debug, layout, all_logits)
    capacity = manifest.get("cache_capacity")
    if layout is Layout.SERVING:
        capacity = need(manifest, "cache_capacity", "integer")
        if capacity <= 0:
            raise mismatch(path, "cache_capacity", "the serving cache's positions, a positive "
                           "integer", capacity, hint=_HINT)
    for index, plugin in enumerate(need(manifest, "plugins", "array")):
        _object(plugin, f"plugins[{index}]", path)
        for key in ("name", "namespace", "version"):
            need(plugin, key, "string", f"plugins[{index}]")
        need(plugin, "layers", "integer", f"plugins[{index}]")
    registration = need(manifest, "plugin_registration", "string", null=True)
    if (registration is None) != (moe == "inline"):
        raise mismatch(path, "plugin_registration", "a registration call for a --moe plugin engine"
                       if moe == "plugin" else "null for a --moe inline engine", registration,
                       hint=_HINT)
    layers = need(manifest, "layers", "object")
    need(layers, "source", "string", "layers")
    items = need(layers, "items", "array", "layers")
    for index, item in enumerate(items):
        _object(item, f"layers.items[{index}]", path)
        need(item, "name", "string", f"layers.items[{index}]")
        need(item, "type", "string", f"layers.items[{index}]")
        if "plugin" in item:
            need(item, "plugin", "object", f"layers.items[{index}]", null=True)
    builder = need(manifest, "builder", "object")
    need(builder, "optimization_level", "integer", "builder")
    timing_cache = need(builder, "timing_cache", "object", "builder", null=True)
    source = need(manifest, "source", "object")
    need(source, "artifact", "string", "source")
    need(source, "manifest_sha256", "string", "source")
    need(source, "precision", "string", "source", choices=(precision.value,))
    need(source, "dtype", "string", "source", choices=(dtype.value,))
    plan = need(manifest, "plan", "object")
    need(plan, "file", "string", "plan", choices=(PLAN_FILE,))
    digest = need(plan, "sha256", "string", "plan")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise mismatch(path, "plan.sha256", "64 lowercase hex digits", digest, hint=_HINT)
    if need(plan, "bytes", "integer", "plan") < 0:
        raise mismatch(path, "plan.bytes", "a size in bytes", plan["bytes"], hint=_HINT)
    build = need(manifest, "build", "object")
    for key in ("wall_s", "parse_s", "build_s"):
        need(build, key, "number", "build")
    _check_source(manifest, path)
    return EngineManifest(
        data=manifest, backend=backend, module=module, version=version, compute_capability=cc,
        moe=moe, precision=precision, dtype=dtype, spec=spec, layout=layout,
        all_logits=all_logits, cache_capacity=capacity, limits=limits, profiles=profiles,
        inputs=manifest["inputs"], outputs=manifest["outputs"], plugins=manifest["plugins"],
        plugin_registration=registration, layers=items, timing_cache=timing_cache,
        plan_bytes=plan["bytes"], plan_sha256=digest, wall_s=float(build["wall_s"]))


def _object(value: Any, where: str, path: Path) -> None:
    if not isinstance(value, dict):
        raise ArtifactError(f"{path}: field '{where}' has the wrong type", expected="object",
                            found=f"{json_type(value)} {json.dumps(value)[:80]}", hint=_HINT)


def _ints(value: Any, where: str, path: Path, length: int | None = None) -> None:
    if (not isinstance(value, list) or (length is not None and len(value) != length)
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ArtifactError(f"{path}: field '{where}' has the wrong type",
                            expected=f"an array of {length or ''} integers".replace("  ", " "),
                            found=json.dumps(value)[:80], hint=_HINT)


def _check_io(manifest: dict, path: Path, spec, dtype: DType, debug: bool, layout: Layout,
              all_logits: bool) -> None:
    """The engine's inputs and outputs are the contract's for its spec, dtype and layout, in
    order."""
    from mixbuild.contract import io_specs

    inputs, outputs = io_specs(spec, dtype, debug, layout, all_logits)
    for key, wanted in (("inputs", inputs), ("outputs", outputs)):
        held = manifest[key]
        pairs = [(t["name"], t["dtype"]) for t in held]
        if pairs != [(t.name, t.dtype) for t in wanted]:
            index = next((i for i, (t, w) in enumerate(zip(held, wanted))
                          if (t["name"], t["dtype"]) != (w.name, w.dtype)), None)
            if index is None:   # one list is a prefix of the other
                raise mismatch(path, key, f"{len(wanted)} {key} (contract.io_specs of the engine's "
                               f"spec: {_names([t.name for t in wanted])})",
                               f"{len(held)} {key}: {_names([t['name'] for t in held])}", hint=_HINT)
            want = wanted[index]
            raise mismatch(path, f"{key}[{index}]", f"{want.name} {want.dtype} (contract.io_specs "
                           "of the engine's spec and dtype)", held[index], hint=_HINT)
        for index, (entry, want) in enumerate(zip(held, wanted)):
            dims = entry["dims"]
            if len(dims) != len(want.dims) or any(isinstance(w, int) and d != w
                                                  for d, w in zip(dims, want.dims)):
                raise mismatch(path, f"{key}[{index}].dims", f"{list(want.dims)} (contract.io_specs of "
                               "the engine's spec)", dims, hint=_HINT)


def _names(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:5])}, ... ({len(names)} in all)"


def _check_source(manifest: dict, path: Path) -> None:
    """precision, dtype and spec as in the source artifact's mixbuild.json, when that file is
    still the one the engine was built from (its sha256 is recorded); otherwise nothing to check."""
    from mixbuild.contract import MANIFEST_FILE
    from mixbuild.exporter.manifest import sha256_file

    source = Path(manifest["source"]["artifact"]) / MANIFEST_FILE
    try:
        if not source.is_file() or sha256_file(source) != manifest["source"]["manifest_sha256"]:
            return
        artifact = json.loads(source.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(artifact, dict):
        return
    pairs = [(key, artifact.get(key), manifest[key]) for key in ("precision", "dtype")]
    theirs, ours = artifact.get("spec"), manifest["spec"]
    if isinstance(theirs, dict):
        pairs += [(f"spec.{k}", theirs.get(k), ours.get(k)) for k in sorted(set(theirs) | set(ours))]
    for name, want, held in pairs:
        if want != held:
            raise mismatch(path, name, f"{json.dumps(want)} (in {source}, the source artifact's "
                           "manifest the engine was built from)", held, hint=_HINT)
