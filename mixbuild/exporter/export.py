"""`mixbuild export`: a checkpoint in, an artifact directory out (model.onnx + external data,
tokenizer files, mixbuild.json).

The graph is traced once on the meta device; each initializer is a lazy tensor that reads its
weights from the checkpoint (memory-mapped) when it is written, one tensor at a time, so peak
memory is bounded by the largest single tensor (one layer's stacked experts), not the model.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from mixbuild import __version__
from mixbuild.atomic import atomic_directory, check_destination, scratch_directory
from mixbuild.contract import (
    ARTIFACT_KIND,
    DATA_FILE,
    DOMAIN,
    DOMAIN_VERSION,
    EXPERT_LOAD_PLOT,
    ONNX_FILE,
    DType,
    ExportFormat,
    Layout,
    Precision,
    io_specs,
)
from mixbuild.errors import UsageError
from mixbuild.exporter.functions import experts_function, gate_function
from mixbuild.exporter.manifest import write_manifest
from mixbuild.exporter.trace import opset_for, trace
from mixbuild.model.checkpoint import Checkpoint
from mixbuild.model.reference import weight_sources
from mixbuild.model.spec import MixtralSpec
from mixbuild.tensors import lazy_tensor


def parse_dtype(text: str) -> DType:
    """The --dtype of an export: fp32 | fp16 | bf16."""
    by_name = {d.short: d for d in DType}
    if text not in by_name:
        raise UsageError(f"unsupported --dtype '{text}'", expected=" | ".join(by_name), found=text)
    return by_name[text]


def attach_weights(onnx_model, ckpt: Checkpoint, dtype: torch.dtype) -> int:
    """Point every empty initializer at its checkpoint tensor (read lazily when saved)."""
    sources = dict(weight_sources(ckpt))
    attached = 0
    for name, value in onnx_model.graph.initializers.items():
        if value.const_value is not None:
            continue
        loader = sources[name]  # KeyError would be an exporter bug, not user input
        value.const_value = lazy_tensor(loader, dtype, value.shape, name)
        attached += 1
    return attached


def attach_functions(onnx_model, spec: MixtralSpec, scheme=None) -> None:
    import onnx_ir as ir

    opset = onnx_model.opset_imports[""]
    for proto in (gate_function(opset), experts_function(spec.num_experts, scheme, opset)):
        fn = ir.serde.deserialize_function(proto)
        onnx_model.functions[fn.identifier()] = fn
    onnx_model.opset_imports[DOMAIN] = DOMAIN_VERSION


def save_model(onnx_model, directory: Path, progress: bool) -> None:
    """Write model.onnx + model.onnx.data, tensor by tensor, with a progress bar."""
    import onnx_ir as ir

    from mixbuild.progress import progress_bar

    with progress_bar("writing weights", total=len(onnx_model.graph.initializers),
                      enabled=progress) as advance:
        ir.save(onnx_model, directory / ONNX_FILE, external_data=DATA_FILE, max_workers=1,
                callback=lambda tensor, info: advance(1, f"writing {tensor.name}"))


def check_artifact_graph(path: Path) -> None:
    import onnx

    from mixbuild.exporter import schemas

    schemas.register()
    onnx.checker.check_model(str(path), full_check=True)


def io_table(spec: MixtralSpec, dtype: DType, debug: bool, layout: Layout = Layout.CONCAT,
             all_logits: bool = False) -> dict[str, Any]:
    inputs, outputs = io_specs(spec, dtype, debug, layout, all_logits)
    return {"inputs": [t.to_dict() for t in inputs], "outputs": [t.to_dict() for t in outputs]}


DEFAULT_LAYOUT = Layout.SERVING   # what runtime, builder and server are built around


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str = "fp32",
                      debug_outputs: bool = False, overwrite: bool = False,
                      progress: bool = True, quant=None, layout: str | Layout | None = None,
                      all_logits: bool = False, format: str | ExportFormat = ExportFormat.ONNX
                      ) -> Path:
    """Export a checkpoint directory to an artifact directory; returns the artifact path.

    `format` "hf" / "hf-modelopt" writes a quantized Hugging Face checkpoint instead (needs
    `quant`; mixbuild/exporter/hf.py: compressed-tensors, or NVIDIA's unified FP8 format), from
    the same calibration and QuantStore tensors as the ONNX artifact.

    `layout` is the KV-cache contract (docs/contract.md): "serving" (the default: a
    fixed-capacity cache updated in place, per-row lengths, last-token logits; `all_logits`
    keeps the logits of every position) or "concat" (past in, present out: the names Optimum
    and onnxruntime-genai read).

    `quant` (a mixbuild.quant.config.QuantConfig) makes an FP8 or INT4 artifact: calibrated
    layer by layer, then the graph is rewritten with lazily quantized weights.
    """
    out = Path(out)
    export_dtype = parse_dtype(dtype)
    explicit_layout = layout is not None
    layout = Layout.parse(layout) if explicit_layout else DEFAULT_LAYOUT
    fmt = ExportFormat.parse(format)
    if fmt is not ExportFormat.ONNX:
        from mixbuild.exporter.hf import export_hf_checkpoint

        onnx_only = {"--debug-outputs": debug_outputs, "--all-logits": all_logits,
                     f"--layout {layout.value}": explicit_layout}
        for flag, used in onnx_only.items():
            if used:
                raise UsageError(f"{flag} is an option of the ONNX artifact",
                                 expected=f"{flag} only with --format onnx",
                                 found=f"{flag} with --format {fmt.value}",
                                 hint=f"drop {flag}: a Hugging Face checkpoint has no graph outputs "
                                      "or KV-cache layout of its own")
        return export_hf_checkpoint(checkpoint, out, quant, fmt=fmt, dtype=export_dtype,
                                    overwrite=overwrite, progress=progress)
    if all_logits and layout is not Layout.SERVING:
        raise UsageError("all-position logits are an option of the serving layout",
                         found=f"layout {layout.value}", hint="the concat layout always returns them")
    inputs = [checkpoint] + ([quant.calib_file] if quant is not None and quant.calib_file else [])
    check_destination(out, overwrite, ARTIFACT_KIND, inputs)
    ckpt = Checkpoint(checkpoint)
    ckpt.verify()
    spec = ckpt.spec
    if quant is not None:
        quant.check_spec(spec)  # an int4 group size must divide every K, before any work
    torch_dtype = export_dtype.torch
    with atomic_directory(out, ARTIFACT_KIND, overwrite, inputs) as tmp, \
            scratch_directory(out) as work:
        calibration = store = None
        if quant is not None:
            from mixbuild.quant.calibrate import calibrate
            from mixbuild.quant.quantize import QuantStore

            store = QuantStore(Path(work))
            calibration = calibrate(ckpt, quant, store, progress=progress)
        onnx_model = trace(spec, torch_dtype, debug=debug_outputs, layout=layout,
                           all_logits=all_logits)
        quant_info = _apply_weights(onnx_model, ckpt, torch_dtype, quant, calibration, store)
        onnx_model.producer_name, onnx_model.producer_version = "mixbuild", __version__
        save_model(onnx_model, tmp, progress)
        check_artifact_graph(tmp / ONNX_FILE)
        for f in ckpt.tokenizer_files():
            shutil.copy2(f, tmp / f.name)
        if layout is Layout.CONCAT:  # genai_config.json, config.json: onnxruntime-genai, Optimum
            from mixbuild.exporter.clients import write_client_configs

            write_client_configs(tmp, ckpt)
        if calibration is not None:
            from mixbuild.exporter.weights import save_smoothing
            from mixbuild.quant.report import plot_expert_load

            save_smoothing(calibration, tmp)
            plot_expert_load(calibration, tmp / EXPERT_LOAD_PLOT)
        write_manifest(tmp, {
            "kind": ARTIFACT_KIND,
            "producer": {"name": "mixbuild", "version": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "spec": spec.to_dict(),
            "precision": (quant.precision if quant else Precision.of_dtype(export_dtype)).value,
            "dtype": export_dtype.value,
            "opset": {"": opset_for(layout), DOMAIN: DOMAIN_VERSION},
            "layout": layout.value,
            "logits": "all" if layout is Layout.CONCAT or all_logits else "last",
            "debug_outputs": debug_outputs,
            "source": {"checkpoint": ckpt.path.name, "bytes": ckpt.nbytes},
            "quantization": quant_info,
            **io_table(spec, export_dtype, debug_outputs, layout, all_logits),
        })
    if calibration is not None and progress:
        from mixbuild.quant.report import print_table

        print_table(calibration, quant.precision.value)
    return out


def _apply_weights(onnx_model, ckpt: Checkpoint, torch_dtype, quant, calibration,
                   store) -> dict | None:
    """Attach the weights: plain, or quantized with the MoE body that dequantizes them."""
    spec = ckpt.spec
    if quant is None:
        attach_weights(onnx_model, ckpt, torch_dtype)
        attach_functions(onnx_model, spec)
        return None
    from mixbuild.exporter.quant_functions import QuantizedWeights
    from mixbuild.quant.report import summary
    from mixbuild.quant.rewrite import quantize_graph

    body = QuantizedWeights(quant.scheme, quant, spec.hidden_size, spec.intermediate_size)
    counts = quantize_graph(onnx_model, ckpt, calibration, quant, torch_dtype, store)
    attach_functions(onnx_model, spec, body)
    head = {"lm_head_weight_rel_error": store.head_error} if quant.lm_head.quantized else {}
    return {**quant.to_dict(), **counts, **head, "layers": summary(calibration)}
