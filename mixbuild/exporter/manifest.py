"""mixbuild.json: what an artifact is, and the hashes that prove its files are intact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mixbuild.contract import ARTIFACT_FORMAT_VERSION, MANIFEST_FILE
from mixbuild.errors import ArtifactError

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


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_FILE
    if not Path(directory).is_dir():
        raise ArtifactError(f"artifact directory not found: {directory}")
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a mixbuild artifact (no {MANIFEST_FILE})",
                            hint="create one with `mixbuild export CHECKPOINT -o DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt manifest", found=str(exc),
                            hint="export the artifact again") from exc
    if manifest.get("format_version") != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported manifest format",
                            expected=f"format_version {ARTIFACT_FORMAT_VERSION}",
                            found=repr(manifest.get("format_version")))
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any], hashes: bool = True) -> None:
    """Every file the manifest lists is present with its size and (optionally) its sha256."""
    for name, entry in manifest["files"].items():
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
