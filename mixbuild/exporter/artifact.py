"""Opening an exported artifact directory: manifest, integrity check, spec."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixbuild.contract import ONNX_FILE
from mixbuild.exporter.manifest import read_manifest, verify_files
from mixbuild.model.spec import MixtralSpec


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict[str, Any]
    spec: MixtralSpec

    @classmethod
    def open(cls, path: str | Path, verify_hashes: bool = True) -> Artifact:
        path = Path(path)
        manifest = read_manifest(path)
        verify_files(path, manifest, hashes=verify_hashes)
        return cls(path, manifest, MixtralSpec.from_dict(manifest["spec"]))

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def precision(self) -> str:
        return self.manifest["precision"]
