"""What `mixbuild inspect` reports about a checkpoint directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixbuild.contract import HF_CONFIG_FILE
from mixbuild.model.checkpoint import Checkpoint
from mixbuild.progress import human_bytes, human_count


def inspect_config(path: str | Path) -> dict[str, Any]:
    """The spec-level part of the report, from config.json alone."""
    from mixbuild.model.spec import MixtralSpec

    spec = MixtralSpec.from_file(Path(path) / HF_CONFIG_FILE)
    return {"kind": "config", "path": str(path), "spec": spec.to_dict(),
            "params": spec.param_counts(), "bytes_per_precision": spec.bytes_per_precision()}


def inspect_checkpoint(path: str | Path, read_values: bool = True, progress: bool = True) -> dict[str, Any]:
    ckpt = Checkpoint(path)
    expected = ckpt.verify()
    checked = 0
    if read_values:
        from mixbuild.progress import track

        for _ in track(ckpt.check_values(), total=len(expected), label="checking weights",
                       enabled=progress):
            checked += 1
    return {
        **inspect_config(ckpt.path),
        "kind": "checkpoint",
        "stored": {"dtypes": ckpt.stored_dtypes, "bytes": ckpt.nbytes, "tensors": len(ckpt.tensors),
                   "files": sorted({i.file.name for i in ckpt.tensors.values()})},
        "checks": {"names_and_shapes": "ok", "values_finite": "ok" if read_values else "skipped",
                   "tensors_read": checked},
        "tokenizer_files": [p.name for p in ckpt.tokenizer_files()],
    }


def render_checkpoint(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    spec, params = report["spec"], report["params"]
    console.print(f"[bold]Mixtral {report['kind']}[/] {report['path']}")
    table = Table(show_header=False, box=None)
    rows = [
        ("layers", spec["num_layers"]), ("hidden", spec["hidden_size"]),
        ("intermediate", spec["intermediate_size"]),
        ("heads (q / kv) x dim", f"{spec['num_heads']} / {spec['num_kv_heads']} x {spec['head_dim']}"),
        ("experts (top-k)", f"{spec['num_experts']} (top-{spec['top_k']})"),
        ("vocab", spec["vocab_size"]), ("max positions", spec["max_position_embeddings"]),
        ("rope theta", spec["rope_theta"]), ("sliding window", spec["sliding_window"]),
        ("tied embeddings", spec["tie_word_embeddings"]), ("config dtype", spec["dtype"]),
        ("parameters", f"{human_count(params['total'])} total, {human_count(params['active'])} "
                       f"active per token ({params['total']:,} / {params['active']:,})"),
        ("size by precision", ", ".join(f"{k} {human_bytes(v)}"
                                        for k, v in report["bytes_per_precision"].items())),
    ]
    if report["kind"] == "checkpoint":
        stored, checks = report["stored"], report["checks"]
        rows += [
            ("stored", f"{', '.join(stored['dtypes'])}, {human_bytes(stored['bytes'])} in "
                       f"{len(stored['files'])} file(s), {stored['tensors']} tensors"),
            ("checks", f"names+shapes {checks['names_and_shapes']}, values {checks['values_finite']}"),
            ("tokenizer", ", ".join(report["tokenizer_files"]) or "none"),
        ]
    for key, value in rows:
        table.add_row(f"[cyan]{key}[/]", str(value))
    console.print(table)


def inspect_artifact(path: str | Path) -> dict[str, Any]:
    """Verify an artifact's files against its manifest and describe its graph."""
    from collections import Counter

    import onnx

    from mixbuild.exporter.artifact import Artifact

    artifact = Artifact.open(path)  # raises on a missing or corrupt file
    graph = onnx.load(str(artifact.onnx_path), load_external_data=False)
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in graph.graph.node)
    manifest = artifact.manifest
    return {
        "kind": "artifact", "path": str(artifact.path), "precision": manifest.precision.value,
        "spec": manifest.data["spec"], "params": artifact.spec.param_counts(),
        "inputs": manifest.inputs, "outputs": manifest.outputs, "opset": manifest.opset,
        "ops": dict(sorted(ops.items())),
        "functions": sorted(f"{f.domain}::{f.name}" for f in graph.functions),
        "files": manifest.files, "hashes": "ok",
    }


def inspect_hf_quantized(path: str | Path) -> dict[str, Any]:
    """Verify a quantized Hugging Face checkpoint written by `mixbuild export --format hf |
    hf-modelopt` against its manifest (every file's sha256) and describe it."""
    from mixbuild.runtime.hf_quantized import read_manifest

    manifest = read_manifest(path)   # raises on a missing or corrupt file
    return {"kind": "quantized checkpoint", "path": str(path), "format": manifest.format,
            "precision": manifest.precision.value, "spec": manifest.data["spec"],
            "params": manifest.spec.param_counts(), "quantization": manifest.quantization,
            "files": manifest.files, "hashes": "ok"}


def render_hf_quantized(report: dict[str, Any]) -> None:
    from rich.console import Console

    spec = report["spec"]
    Console().print(f"[bold]mixbuild quantized checkpoint[/] {report['path']}  "
                    f"{report['format']} [bold]{report['precision']}[/], {spec['num_layers']} "
                    f"layers, {spec['num_experts']} experts (top-{spec['top_k']}), "
                    f"{human_count(report['params']['total'])} parameters")
    _render_files(report["files"])


def _render_files(files: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("file", "size", "sha256", title="files (hashes verified)")
    for name, entry in files.items():
        table.add_row(name, human_bytes(entry["bytes"]), entry["sha256"][:16] + "...")
    Console().print(table)


def render_artifact(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    spec = report["spec"]
    console.print(f"[bold]mixbuild artifact[/] {report['path']}  precision [bold]{report['precision']}[/]"
                  f", {spec['num_layers']} layers, {spec['num_experts']} experts (top-{spec['top_k']})"
                  f", {human_count(report['params']['total'])} parameters")
    _render_files(report["files"])
    io = Table("", "name", "dtype", title="ONNX contract")
    for kind in ("inputs", "outputs"):
        shown = report[kind] if len(report[kind]) <= 8 else report[kind][:5] + [{"name": "...", "dtype": ""}]
        for entry in shown:
            io.add_row(kind[:-1], entry["name"], entry["dtype"])
    console.print(io)
    ops = Table("op", "count", title="graph ops")
    for op, count in report["ops"].items():
        ops.add_row(f"[bold]{op}[/]" if "::" in op else op, str(count))
    console.print(ops)
    console.print(f"model-local functions: {', '.join(report['functions'])}")
