"""Opening an exported artifact directory: manifest, integrity check, spec, and the manifest
checked against the graph it describes (mixbuild/exporter/consistency.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixbuild.contract import MANIFEST_FILE, ONNX_FILE, DType, Layout, Precision
from mixbuild.errors import ArtifactError, ConfigError
from mixbuild.exporter.consistency import check_graph
from mixbuild.exporter.manifest import read_manifest, verify_files
from mixbuild.model.spec import MixtralSpec
from mixbuild.schemes import Scheme, scheme_named, scheme_of


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict[str, Any]
    spec: MixtralSpec

    @classmethod
    def open(cls, path: str | Path, verify_hashes: bool = True) -> Artifact:
        """Read and check mixbuild.json (every field and its type), every listed file's size
        and sha256, the spec, and the manifest against model.onnx; ArtifactError otherwise."""
        path = Path(path)
        manifest = read_manifest(path)
        verify_files(path, manifest, hashes=verify_hashes)
        spec = spec_of(manifest["spec"], path / MANIFEST_FILE)
        check_graph(path, manifest, spec)
        return cls(path, manifest, spec)

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    # The manifest's fields as their types (each checked against the graph by check_graph when
    # the artifact was opened).
    @property
    def precision(self) -> Precision:
        return Precision.parse(self.manifest["precision"])

    @property
    def dtype(self) -> DType:
        return DType.parse(self.manifest["dtype"])

    @property
    def layout(self) -> Layout:
        """The KV-cache layout (absent from manifests older than the serving layout: concat)."""
        return Layout(self.manifest.get("layout", Layout.CONCAT.value))

    @property
    def all_logits(self) -> bool:
        """Whether a serving-layout graph returns every position's logits (--all-logits)."""
        return self.manifest.get("logits") == "all"

    @property
    def scheme(self) -> Scheme:
        """The weight scheme of the quantized linears and experts (FLOAT: none)."""
        return scheme_of(self.precision)

    @property
    def head_scheme(self) -> Scheme:
        """How lm_head is stored: FLOAT (the graph's float type), INT8 or INT4."""
        return scheme_named((self.manifest.get("quantization") or {}).get("lm_head", "float"))


def spec_of(data: Any, source: Path, hint: str = "export the artifact again") -> MixtralSpec:
    """The `spec` of a manifest (artifact or engine): ArtifactError naming the file and field."""
    try:
        return MixtralSpec.from_dict(data, source=f"{source}: spec")
    except ConfigError as exc:
        # the ConfigError's message is all of it: no second "cause" line
        raise ArtifactError(exc.what, expected=exc.expected, found=exc.found, hint=hint) from None
