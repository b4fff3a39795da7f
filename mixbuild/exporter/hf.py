"""`mixbuild export --format hf | hf-modelopt`: a quantized Hugging Face checkpoint directory
that vLLM, SGLang and TensorRT-LLM load, holding exactly the weights and scales of mixbuild's own
calibration (the QuantStore tensors the ONNX export writes; docs/precision.md, "Quantized
Hugging Face checkpoints").

Output directory (Mixtral's on-disk names, mixbuild/model/names.py):

    config.json                  the source config, `dtype` set, `quantization_config` added
    model-0000N-of-0000M.safetensors + model.safetensors.index.json
                                 shard 1: embeddings, final norm, lm_head; shard 2+L: layer L
    tokenizer files, generation_config.json (copied from the checkpoint)
    hf_quant_config.json         hf-modelopt only (NVIDIA's unified format)
    mixbuild_checkpoint.json     mixbuild's manifest: calibration, per-layer summary, sha256

Formats, as their loaders read them (the sources followed are named in each writer below):

compressed-tensors, fp8 ("float-quantized", W8A8 static):
    <linear>.weight        float8_e4m3fn [N, K]
    <linear>.weight_scale  float32 [N, 1] (strategy "channel") or [1] (strategy "tensor")
    <linear>.input_scale   float32 [1]    static per-tensor activation scale
compressed-tensors, int4 ("pack-quantized", W4A16 symmetric, strategy "group"):
    <linear>.weight_packed int32 [N, K / 8]  codes + 8 as unsigned nibbles, 8 per int32, element
                           k % 8 = j in bits 4j..4j+3 (first value in the lowest bits)
    <linear>.weight_scale  activation dtype [N, K / G]
    <linear>.weight_shape  int64 [2] = (N, K)
NVIDIA unified (ModelOpt) fp8 (quant_algo "FP8": per-tensor weight scales, static inputs):
    <linear>.weight        float8_e4m3fn [N, K]
    <linear>.weight_scale  float32 []   <linear>.input_scale  float32 []

<linear> is every attention projection and every expert's w1 / w2 / w3. The router
(`block_sparse_moe.gate`), the embeddings, the norms and lm_head stay in the activation dtype
(compressed-tensors `ignore`, ModelOpt `exclude_modules`), with the AWQ smoothing folded into
the norms and the router exactly as mixbuild.quant.quantize.SmoothedWeights folds it, so the
checkpoint is self-contained and needs nothing mixbuild-specific to run.

Memory is bounded as in the ONNX export: one layer's quantized tensors are read from the
QuantStore and written to that layer's shard, then dropped.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from mixbuild import __version__
from mixbuild.atomic import atomic_directory, check_destination, scratch_directory
from mixbuild.contract import (
    EXPERT_LOAD_PLOT,
    HF_CHECKPOINT_KIND,
    HF_CONFIG_FILE,
    HF_FORMAT_VERSION,
    HF_INDEX_FILE,
    HF_MANIFEST_FILE,
    HF_MODELOPT_CONFIG_FILE,
    DType,
    ExportFormat,
)
from mixbuild.errors import UsageError
from mixbuild.exporter.manifest import sha256_file
from mixbuild.model.checkpoint import Checkpoint
from mixbuild.model.names import tensor_name
from mixbuild.tensors import cast_finite

COMPRESSED_TENSORS = "compressed-tensors"
MODELOPT = "modelopt"
_FORMAT_NAME = {ExportFormat.HF: COMPRESSED_TENSORS, ExportFormat.HF_MODELOPT: MODELOPT}
# The version of compressed-tensors whose code this layout was checked against
# (compressed_tensors/compressors/pack_quantized/helpers.py: pack_to_int32; transformers 5.24 and
# vLLM 0.32 load it).
COMPRESSED_TENSORS_VERSION = "0.20.1"

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_ACT_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in"}


# --------------------------------------------------------------------------------- checks

def check_hf_options(fmt: ExportFormat, quant) -> None:
    """Refuse (UsageError) a format / precision pair that cannot be written, before any work."""
    if quant is None:
        raise UsageError(f"--format {fmt.value} writes a quantized Hugging Face checkpoint",
                         expected="--precision fp8 or int4 with --format hf / hf-modelopt",
                         found=f"--format {fmt.value} with --precision float",
                         hint="a float checkpoint is already a Hugging Face checkpoint: serve the "
                              "source directory as it is, or pass --precision fp8 | int4")
    if quant.lm_head.quantized:
        raise UsageError("--lm-head is an option of the ONNX artifact",
                         expected="--lm-head float (the default) with --format hf / hf-modelopt",
                         found=f"--lm-head {quant.lm_head.value} with --format {fmt.value}",
                         hint="drop --lm-head: the Hugging Face hand-off lists lm_head as "
                              "unquantized (vLLM and TensorRT-LLM keep it in high precision)")
    quant.scheme.check_hf(fmt, quant)


class _Writer:
    """The tensors of one linear in the chosen format (name -> tensor): the scheme's."""

    def __init__(self, fmt: ExportFormat, quant, dtype: torch.dtype) -> None:
        self.fmt, self.quant, self.dtype = fmt, quant, dtype

    def linear(self, prefix: str, q: torch.Tensor, scale: torch.Tensor,
               act_scale: float | None) -> dict[str, torch.Tensor]:
        """q / scale in mixbuild.plugins.formats layout for one matrix [N, K]."""
        return self.quant.scheme.hf_linear(prefix, q, scale, act_scale, self.fmt, self.quant,
                                           self.dtype)


# ------------------------------------------------------------------------------- the export

def export_hf_checkpoint(checkpoint: str | Path, out: str | Path, quant,
                         fmt: str | ExportFormat = ExportFormat.HF, dtype: str | DType = "fp32",
                         overwrite: bool = False, progress: bool = True) -> Path:
    """Calibrate (mixbuild.quant.calibrate, layer by layer) and write a quantized Hugging Face
    checkpoint directory to `out`, atomically; returns its path.

    `quant` is a QuantConfig (fp8 or int4); `fmt` ExportFormat.HF (compressed-tensors, fp8 or
    int4) or ExportFormat.HF_MODELOPT (NVIDIA's unified format, fp8 with per-tensor weight
    scales); `dtype` the type of the float tensors (embeddings, norms, router, lm_head) and of the
    int4 scales, recorded as config.json's `dtype`.
    """
    from mixbuild.quant.calibrate import calibrate
    from mixbuild.quant.quantize import QuantStore, SmoothedWeights

    out = Path(out)
    fmt = ExportFormat.parse(fmt)
    if fmt is ExportFormat.ONNX:
        raise UsageError("export_hf_checkpoint writes Hugging Face formats",
                         expected="hf | hf-modelopt", found="onnx")
    check_hf_options(fmt, quant)
    act = DType.parse(dtype)
    inputs = [checkpoint] + ([quant.calib_file] if quant.calib_file else [])
    check_destination(out, overwrite, HF_CHECKPOINT_KIND, inputs)
    ckpt = Checkpoint(checkpoint)
    ckpt.verify()
    spec = ckpt.spec
    quant.check_spec(spec)
    quant.scheme.check_hf_spec(spec)
    with atomic_directory(out, HF_CHECKPOINT_KIND, overwrite, inputs) as tmp, \
            scratch_directory(out) as work:
        store = QuantStore(Path(work))
        calibration = calibrate(ckpt, quant, store, progress=progress)
        smoothed = SmoothedWeights(ckpt, calibration)
        writer = _Writer(fmt, quant, act.torch)
        shards = _write_shards(tmp, ckpt, calibration, store, smoothed, writer, progress)
        _write_configs(tmp, ckpt, quant, fmt, act)
        for f in ckpt.tokenizer_files():
            shutil.copy2(f, tmp / f.name)
        from mixbuild.quant.report import plot_expert_load, summary

        plot_expert_load(calibration, tmp / EXPERT_LOAD_PLOT)
        _write_manifest(tmp, {
            "kind": HF_CHECKPOINT_KIND,
            "format": _FORMAT_NAME[fmt],
            "producer": {"name": "mixbuild", "version": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "spec": spec.to_dict(),
            "precision": quant.precision.value,
            "dtype": act.value,
            "source": {"checkpoint": ckpt.path.name, "bytes": ckpt.nbytes},
            "shards": shards,
            "quantization": {**quant.to_dict(), "layers": summary(calibration)},
        })
    if progress:
        from mixbuild.quant.report import print_table

        print_table(calibration, quant.precision.value)
    return out


def _readable(path: Path) -> None:
    """safetensors creates its files 0600; give them the usual 0666 & ~umask, like every other
    file of the output (a server often runs as another user)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def _write_shards(directory: Path, ckpt: Checkpoint, calibration, store, smoothed, writer: _Writer,
                  progress: bool) -> int:
    """One shard for the embeddings / final norm / lm_head, then one per decoder layer (only
    that layer's tensors in memory); writes model.safetensors.index.json. Returns the count."""
    from safetensors.torch import save_file

    from mixbuild.progress import track

    spec = ckpt.spec
    total = spec.num_layers + 1
    weight_map: dict[str, str] = {}
    size = 0

    def save(index: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal size
        name = _shard_name(index, total)
        # clone: w1 and w3 of a per-tensor expert share one scale, which safetensors refuses
        tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        _readable(directory / name)
        for key, value in tensors.items():
            weight_map[key] = name
            size += value.numel() * value.element_size()

    dtype = writer.dtype
    top = {tensor_name("embed"): cast_finite(smoothed("embed.weight"), dtype, "embed"),
           tensor_name("final_norm"): cast_finite(smoothed("norm.weight"), dtype, "final_norm")}
    if not spec.tie_word_embeddings:
        top[tensor_name("lm_head")] = cast_finite(smoothed("lm_head.weight"), dtype, "lm_head")
    save(1, top)
    for layer in track(range(spec.num_layers), total=spec.num_layers, label="writing layers",
                       enabled=progress):
        save(layer + 2, _layer_tensors(layer, spec, calibration[layer], store, smoothed, writer))
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / HF_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return total


def _layer_tensors(layer: int, spec, calib, store, smoothed, writer: _Writer) -> dict:
    """Every on-disk tensor of one decoder layer: smoothed float norms and router, quantized
    attention projections and experts (w_gate_up rows 0..I-1 are w1, I..2I-1 are w3)."""
    p = f"layers.{layer}."
    dtype = writer.dtype
    out = {}
    for param, role in (("input_norm.weight", "input_norm"), ("post_norm.weight", "post_norm"),
                        ("moe.gate.weight", "router")):
        out[tensor_name(role, layer)] = cast_finite(smoothed(p + param), dtype, p + param)
    for proj in _ATTN:
        q, scale = store.get(f"{p}attn.{proj}.weight")
        name = tensor_name(proj, layer).removesuffix(".weight")
        out.update(writer.linear(name, q, scale, calib.amax[_ACT_INPUT[proj]]))
    inter = spec.intermediate_size
    gate_up_q, gate_up_s = store.get(f"{p}moe.w_gate_up")
    down_q, down_s = store.get(f"{p}moe.w_down")
    for e in range(spec.num_experts):
        halves = {"w1": slice(0, inter), "w3": slice(inter, 2 * inter)}
        for role, rows in halves.items():
            scale = gate_up_s[e] if gate_up_s.dim() == 1 else gate_up_s[e, rows]
            name = tensor_name(role, layer, e).removesuffix(".weight")
            out.update(writer.linear(name, gate_up_q[e, rows], scale, calib.amax["moe_in"]))
        name = tensor_name("w2", layer, e).removesuffix(".weight")
        out.update(writer.linear(name, down_q[e], down_s[e], calib.down_in_amax[e]))
    return out


# ---------------------------------------------------------------------------------- configs

def _ignored(spec) -> list[str]:
    """Modules left in high precision, by full module name (as llm-compressor writes them):
    lm_head and every layer's router."""
    return ["lm_head"] + [tensor_name("router", i).removesuffix(".weight")
                          for i in range(spec.num_layers)]


def compressed_tensors_config(quant, spec) -> dict[str, Any]:
    """config.json's `quantization_config` for compressed-tensors (the keys of
    compressed_tensors.quantization.QuantizationConfig as it serialises them; transformers'
    CompressedTensorsConfig and vLLM's CompressedTensorsConfig.from_config read it)."""
    weights, inputs, fmt = quant.scheme.compressed_tensors(quant)
    return {
        "quant_method": COMPRESSED_TENSORS,
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": inputs, "output_activations": None,
                                      "format": fmt}},
        "ignore": _ignored(spec),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def modelopt_configs(spec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hf_quant_config.json, config.json's quantization_config) of NVIDIA's unified format:
    the legacy file TensorRT-LLM and vLLM's ModelOptFp8Config.get_config_filenames read
    (`{"producer", "quantization": {"quant_algo", "kv_cache_quant_algo", "exclude_modules"}}`),
    and the config.json form (`quant_method: modelopt`, `quant_algo`, `ignore`) newer ModelOpt
    releases write and vLLM's ModelOptQuantConfigBase.from_config also accepts."""
    exclude = ["lm_head", "model.layers.*.block_sparse_moe.gate"]
    legacy = {"producer": {"name": "mixbuild", "version": __version__},
              "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None,
                               "exclude_modules": exclude}}
    inline = {"quant_method": MODELOPT, "quant_algo": "FP8", "kv_cache_scheme": None,
              "ignore": exclude, "producer": {"name": "mixbuild", "version": __version__}}
    return legacy, inline


def _write_configs(directory: Path, ckpt: Checkpoint, quant, fmt: ExportFormat, act: DType) -> None:
    config = json.loads((ckpt.path / HF_CONFIG_FILE).read_text())   # the spec parsed it already
    config.pop("torch_dtype", None)
    config["dtype"] = act.value
    config["use_cache"] = True
    if fmt is ExportFormat.HF_MODELOPT:
        legacy, inline = modelopt_configs(ckpt.spec)
        (directory / HF_MODELOPT_CONFIG_FILE).write_text(json.dumps(legacy, indent=2) + "\n")
        config["quantization_config"] = inline
    else:
        config["quantization_config"] = compressed_tensors_config(quant, ckpt.spec)
    (directory / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != HF_MANIFEST_FILE}
    manifest = {**manifest, "format_version": HF_FORMAT_VERSION, "files": files}
    (directory / HF_MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
