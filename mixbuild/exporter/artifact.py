"""Opening an exported artifact directory: manifest, integrity check, spec, and the manifest
checked against the graph it describes (mixbuild/exporter/consistency.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mixbuild.contract import ONNX_FILE, DType, Layout, Precision
from mixbuild.exporter.consistency import check_graph
from mixbuild.exporter.manifest import ArtifactManifest, read_manifest, verify_files
from mixbuild.model.spec import MixtralSpec
from mixbuild.schemes import Scheme


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: ArtifactManifest

    @classmethod
    def open(cls, path: str | Path, verify_hashes: bool = True) -> Artifact:
        """Read and check mixbuild.json (every field and its type, the spec), every listed
        file's size and sha256, and the manifest against model.onnx; ArtifactError otherwise."""
        path = Path(path)
        manifest = read_manifest(path)
        verify_files(path, manifest, hashes=verify_hashes)
        check_graph(path, manifest)
        return cls(path, manifest)

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    # The manifest's fields most callers read (each checked against the graph when the artifact
    # was opened).
    @property
    def spec(self) -> MixtralSpec:
        return self.manifest.spec

    @property
    def precision(self) -> Precision:
        return self.manifest.precision

    @property
    def dtype(self) -> DType:
        return self.manifest.dtype

    @property
    def layout(self) -> Layout:
        return self.manifest.layout

    @property
    def all_logits(self) -> bool:
        """Whether the graph returns every position's logits (concat; serving --all-logits)."""
        return self.manifest.all_logits

    @property
    def scheme(self) -> Scheme:
        return self.manifest.scheme

    @property
    def head_scheme(self) -> Scheme:
        return self.manifest.head_scheme
