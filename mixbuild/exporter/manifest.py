"""mixbuild.json: what an artifact is, and the hashes that prove its files are intact."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixbuild.contract import (
    ARTIFACT_FORMAT_VERSION,
    ARTIFACT_KIND,
    DOMAIN,
    MANIFEST_FILE,
    ONNX_FILE,
    DType,
    Layout,
    Precision,
)
from mixbuild.errors import ArtifactError, ConfigError, MixbuildError
from mixbuild.jsonfile import json_type, read_json_object
from mixbuild.model.spec import MixtralSpec
from mixbuild.schemes import Scheme, scheme_named, scheme_of

_CHUNK = 16 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_table(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in the directory (the manifest itself excluded)."""
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = {**manifest, "format_version": ARTIFACT_FORMAT_VERSION, "files": file_table(directory)}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@dataclass(frozen=True)
class ArtifactManifest:
    """mixbuild.json, parsed and checked once (`read_manifest`): its fields as their types.
    `data` is the JSON object as written, for reports; code reads the attributes. The values
    are checked against each other and against the graph by mixbuild.exporter.consistency
    when the artifact is opened."""

    data: dict[str, Any]
    spec: MixtralSpec
    precision: Precision
    dtype: DType
    layout: Layout
    all_logits: bool            # the graph returns every position's logits (concat: always)
    debug_outputs: bool
    opset: dict[str, int]
    files: dict[str, dict[str, Any]]
    quantization: dict[str, Any] | None
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]

    @property
    def scheme(self) -> Scheme:
        """The weight scheme of the quantized linears and experts (FLOAT: none)."""
        return scheme_of(self.precision)

    @property
    def head_scheme(self) -> Scheme:
        """How lm_head is stored: FLOAT (the graph's float type), INT8 or INT4."""
        return scheme_named((self.quantization or {}).get("lm_head", "float"))

    @property
    def group_size(self) -> int | None:
        """A grouped scheme's group size along K (None: not grouped)."""
        return self.quantization["group_size"] if self.scheme.grouped else None


def spec_of(data: Any, source: Path, hint: str = "export the artifact again",
            error: type[MixbuildError] = ArtifactError) -> MixtralSpec:
    """The `spec` of a manifest (artifact, engine, quantized checkpoint): `error` (ArtifactError
    by default) naming the file and field."""
    try:
        return MixtralSpec.from_dict(data, source=f"{source}: spec")
    except ConfigError as exc:
        # the ConfigError's message is all of it: no second "cause" line
        raise error(exc.what, expected=exc.expected, found=exc.found, hint=hint) from None


def recorded_layout(manifest: dict[str, Any], path: Path, hint: str) -> tuple[Layout, bool]:
    """(KV-cache layout, every position's logits) as mixbuild.json or engine.json records them:
    "layout" (absent: concat, what manifests older than the serving layout mean) and "logits"
    ("all" | "last"; absent: a concat graph's "all", a serving graph's "last"; a concat graph
    always returns all)."""
    layout = Layout(field(manifest, "layout", "string", path, choices=tuple(m.value for m in Layout),
                          hint=hint) if "layout" in manifest else Layout.CONCAT.value)
    default = "all" if layout is Layout.CONCAT else "last"
    logits = (field(manifest, "logits", "string", path, choices=("all", "last"), hint=hint)
              if "logits" in manifest else default)
    if layout is Layout.CONCAT and logits != "all":
        raise mismatch(path, "logits", "'all' (a concat-layout graph returns every position's "
                       "logits) or, for the serving layout, 'last'", logits, hint=hint)
    return layout, logits == "all"


def read_manifest(directory: Path) -> ArtifactManifest:
    """mixbuild.json, its format version and every field the contract lists with its type
    (ArtifactError naming the field otherwise), as an ArtifactManifest."""
    path = Path(directory) / MANIFEST_FILE
    if not Path(directory).is_dir():
        raise ArtifactError(f"artifact directory not found: {directory}")
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a mixbuild artifact (no {MANIFEST_FILE})",
                            hint="create one with `mixbuild export CHECKPOINT -o DIR`")
    manifest = read_json_object(path, ArtifactError, "manifest", "export the artifact again")
    version = manifest.get("format_version")
    if type(version) is not int or version != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported manifest format",
                            expected=f"format_version {ARTIFACT_FORMAT_VERSION}",
                            found=repr(version))
    return check_manifest(manifest, path)


# ------------------------------------------------------------------------- field checks

_HINT = "the manifest was edited or damaged; export the artifact again"
def _short(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def field(obj: dict, key: str, kind: str, path: Path, where: str = "", *, null: bool = False,
          choices: tuple | None = None, hint: str = _HINT) -> Any:
    """obj[key], checked to be of JSON type `kind` (or null when `null`) and, with `choices`,
    one of them; ArtifactError naming `path` and the field (`where.key`) otherwise."""
    name = f"{where}.{key}" if where else key
    if key not in obj:
        raise ArtifactError(f"{path}: required field '{name}' is missing",
                            expected=f"{'an' if kind[0] in 'aeio' else 'a'} {kind}", hint=hint)
    value = obj[key]
    if value is None and null:
        return None
    found = json_type(value)
    if found != kind and not (kind == "number" and found == "integer"):
        raise ArtifactError(f"{path}: field '{name}' has the wrong type",
                            expected=kind + (" or null" if null else ""),
                            found=f"{found} {_short(value)}", hint=hint)
    if choices is not None and value not in choices:
        raise ArtifactError(f"{path}: field '{name}' has an unknown value",
                            expected=" | ".join(map(str, choices)), found=_short(value), hint=hint)
    return value


def mismatch(path: Path, name: str, expected: str, found: Any, hint: str = _HINT) -> ArtifactError:
    """The error for a field whose value contradicts what it describes."""
    return ArtifactError(f"{path}: field '{name}' does not match the artifact", expected=expected,
                         found=_short(found), hint=hint)


def check_manifest(manifest: dict[str, Any], path: Path) -> ArtifactManifest:
    """Every field of mixbuild.json present with its type (docs/contract.md), the file names
    plain file names and the spec valid (MixtralSpec.from_dict); the values are checked against
    each other and against the graph by mixbuild.exporter.consistency."""
    field(manifest, "kind", "string", path, choices=(ARTIFACT_KIND,))
    for key in ("producer", "spec", "opset", "source", "files"):
        field(manifest, key, "object", path)
    field(manifest, "precision", "string", path, choices=tuple(p.value for p in Precision))
    field(manifest, "dtype", "string", path, choices=tuple(d.value for d in DType))
    field(manifest, "debug_outputs", "boolean", path)
    for key in ("", DOMAIN):
        field(manifest["opset"], key, "integer", path, "opset")
    for key in ("inputs", "outputs"):
        for index, entry in enumerate(field(manifest, key, "array", path)):
            if not isinstance(entry, dict):
                raise ArtifactError(f"{path}: field '{key}[{index}]' has the wrong type",
                                    expected="an object {name, dtype}", found=_short(entry),
                                    hint=_HINT)
            for part in ("name", "dtype"):
                field(entry, part, "string", path, f"{key}[{index}]")
    for name, entry in manifest["files"].items():
        where = f"files[{json.dumps(name)}]"
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ArtifactError(f"{path}: field '{where}' is not a file name of the artifact",
                                expected="a plain file name inside the artifact directory",
                                found=_short(name), hint=_HINT)
        if not isinstance(entry, dict):
            raise ArtifactError(f"{path}: field '{where}' has the wrong type",
                                expected="an object {sha256, bytes}", found=_short(entry), hint=_HINT)
        digest = field(entry, "sha256", "string", path, where)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ArtifactError(f"{path}: field '{where}.sha256' is not a sha256 digest",
                                expected="64 lowercase hex digits", found=_short(digest), hint=_HINT)
        if field(entry, "bytes", "integer", path, where) < 0:
            raise ArtifactError(f"{path}: field '{where}.bytes' is negative",
                                found=str(entry["bytes"]), hint=_HINT)
    if ONNX_FILE not in manifest["files"]:
        raise ArtifactError(f"{path}: field 'files' does not list {ONNX_FILE}",
                            expected=f"{ONNX_FILE} with its sha256 and size", hint=_HINT)
    quantization = field(manifest, "quantization", "object", path, null=True)
    layout, all_logits = recorded_layout(manifest, path, _HINT)
    return ArtifactManifest(
        data=manifest, spec=spec_of(manifest["spec"], path), precision=Precision(manifest["precision"]),
        dtype=DType(manifest["dtype"]), layout=layout, all_logits=all_logits,
        debug_outputs=manifest["debug_outputs"], opset=manifest["opset"], files=manifest["files"],
        quantization=quantization, inputs=manifest["inputs"], outputs=manifest["outputs"])


def verify_files(directory: Path, manifest: ArtifactManifest, hashes: bool = True) -> None:
    """Every file the manifest lists is present with its size and (optionally) its sha256."""
    for name, entry in manifest.files.items():
        path = Path(directory) / name
        if not path.is_file():
            raise ArtifactError(f"artifact file missing: {path}", hint="export the artifact again")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"artifact file has the wrong size: {path}",
                                expected=f"{entry['bytes']} bytes", found=f"{size} bytes",
                                hint="the file is truncated or was replaced; export again")
        if hashes and sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"artifact file is corrupt (sha256 mismatch): {path}",
                                expected=entry["sha256"], found="a different digest",
                                hint="the file changed after export; export the artifact again")
