"""A quantized Hugging Face checkpoint written by `mixbuild export --format hf` (compressed-
tensors, fp8 or int4) or `--format hf-modelopt` (NVIDIA's unified fp8), loaded into mixbuild's
torch reference model with the dequantization the serving engines apply, behind the Runner
contract (mixbuild/runtime/runner.py).

Numerics (those of vLLM's compressed-tensors / ModelOpt kernels and of mixbuild's ONNX bodies,
mixbuild/exporter/quant_functions.py):

- fp8 (W8A8, static): every quantized linear's input is fake-quantized with its static
  `input_scale` (`e4m3(clamp(x / s, +-448)) * s`, in float32), and its weight is
  `float(weight_fp8) * weight_scale` (per channel [N, 1] or per tensor). Inside the MoE the
  expert input uses w1's (= w3's) input scale and the SwiGLU output w2's, per expert.
- int4 (W4A16): `unpack(weight_packed) * weight_scale` per group of G along K; activations are
  not quantized.

The router, norms, embeddings and lm_head load as they are (the AWQ smoothing is already folded
into them by the export). Only checkpoints written by mixbuild are accepted: the manifest
(mixbuild_checkpoint.json) is read and every file's sha256 checked first, so a damaged scale or
shard is a CheckpointError naming the file, never silently wrong numbers.

Entry point: `load_runner(path, debug=False)` -> a TorchRunner (runtime/torch_runner.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mixbuild.contract import (
    HF_CHECKPOINT_KIND,
    HF_CONFIG_FILE,
    HF_FORMAT_VERSION,
    HF_INDEX_FILE,
    HF_MANIFEST_FILE,
    Layout,
    Precision,
)
from mixbuild.errors import CheckpointError
from mixbuild.exporter.manifest import spec_of
from mixbuild.model.names import tensor_name
from mixbuild.model.spec import MixtralSpec
from mixbuild.plugins import formats
from mixbuild.schemes import Scheme, scheme_of

_HINT = "export the checkpoint again with `mixbuild export ... --format hf`"
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def is_hf_quantized(path: str | Path) -> bool:
    """Whether `path` is a quantized Hugging Face checkpoint written by mixbuild."""
    try:
        data = json.loads((Path(path) / HF_MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == HF_CHECKPOINT_KIND


@dataclass(frozen=True)
class HfManifest:
    """mixbuild_checkpoint.json (with config.json's quantization_config), parsed and checked
    once (`read_manifest`): its fields as their types; `data` the JSON as written."""

    data: dict[str, Any]
    format: str                  # "compressed-tensors" | "modelopt"
    spec: MixtralSpec
    precision: Precision
    group_size: int | None       # a grouped scheme's group size along K
    quantization: dict[str, Any]
    files: dict[str, dict[str, Any]]

    @property
    def scheme(self) -> Scheme:
        return scheme_of(self.precision)


def read_manifest(path: str | Path, verify: bool = True) -> HfManifest:
    """mixbuild_checkpoint.json, checked: its kind and version, its fields with their types,
    and (verify) every file it lists present with its size and sha256."""
    from mixbuild.exporter.manifest import sha256_file

    path = Path(path)
    if not is_hf_quantized(path):
        raise CheckpointError(f"{path} is not a quantized checkpoint written by mixbuild "
                              f"(no valid {HF_MANIFEST_FILE})", hint=_HINT)
    manifest = json.loads((path / HF_MANIFEST_FILE).read_text())
    if manifest.get("format_version") != HF_FORMAT_VERSION:
        raise CheckpointError(f"{path / HF_MANIFEST_FILE}: unsupported format version",
                              expected=str(HF_FORMAT_VERSION),
                              found=repr(manifest.get("format_version")), hint=_HINT)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path / HF_MANIFEST_FILE}: no file table", hint=_HINT)
    for name, entry in files.items():
        f = path / name
        if "/" in name or not f.is_file():
            raise CheckpointError(f"checkpoint file missing: {f}", hint=_HINT)
        if f.stat().st_size != entry.get("bytes"):
            raise CheckpointError(f"checkpoint file has the wrong size: {f}",
                                  expected=f"{entry.get('bytes')} bytes",
                                  found=f"{f.stat().st_size} bytes", hint=_HINT)
        if verify and sha256_file(f) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint file is corrupt (sha256 mismatch): {f}",
                                  expected=str(entry.get("sha256")), found="a different digest",
                                  hint="the file changed after export (damaged scales or "
                                       "weights); " + _HINT)
    return _typed(path, manifest, files)


def _typed(path: Path, manifest: dict[str, Any], files: dict) -> HfManifest:
    where = path / HF_MANIFEST_FILE

    def need(key: str, kind: type, choices: tuple | None = None):
        value = manifest.get(key)
        if not isinstance(value, kind) or (choices is not None and value not in choices):
            raise CheckpointError(f"{where}: field '{key}' is missing or wrong",
                                  expected=" | ".join(choices) if choices else kind.__name__,
                                  found=repr(value)[:80], hint=_HINT)
        return value
    precision = Precision(need("precision", str, tuple(p.value for p in Precision if p.quantized)))
    spec = spec_of(need("spec", dict), where, _HINT, CheckpointError)
    config = json.loads((path / HF_CONFIG_FILE).read_text())
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path / HF_CONFIG_FILE} has no quantization_config", hint=_HINT)
    try:
        group = scheme_of(precision).hf_group_size(qc)
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / HF_CONFIG_FILE}: quantization_config has no group size",
                              expected="config_groups.group_0.weights.group_size",
                              found=f"missing {exc}", hint=_HINT) from None
    return HfManifest(data=manifest, format=need("format", str), spec=spec, precision=precision,
                      group_size=group, quantization=need("quantization", dict),
                      files=files)


class _Tensors:
    """Lazy reads through model.safetensors.index.json (one shard open at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        index = json.loads((path / HF_INDEX_FILE).read_text())
        self.weight_map: dict[str, str] = index["weight_map"]
        self._open: tuple[str, object] | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def __call__(self, name: str) -> Tensor:
        from safetensors import safe_open

        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name} is missing",
                                  expected=f"{name} in {HF_INDEX_FILE}", hint=_HINT)
        shard = self.weight_map[name]
        if self._open is None or self._open[0] != shard:
            self._open = (shard, safe_open(str(self.path / shard), "pt"))
        return self._open[1].get_tensor(name)


class QuantLinear(nn.Module):
    """y = fake_quant_fp8(x, input_scale) @ W.T (fp8) or x @ W.T (int4), W already dequantized
    to float32."""

    def __init__(self, weight: Tensor, input_scale: Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("input_scale", input_scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_scale is not None:
            x = formats.fake_quantize_fp8(x, self.input_scale).to(x.dtype)
        return x @ self.weight.T.to(x.dtype)


class QuantSparseMoE(nn.Module):
    """SparseMoE with dequantized experts and, for fp8, the static per-expert activation
    fake-quantization of the expert input (scale_in [E]) and of the SwiGLU output
    (scale_down [E]), as the ONNX body and the fused-MoE kernels apply it."""

    def __init__(self, gate: Tensor, w_gate_up: Tensor, w_down: Tensor, top_k: int,
                 scale_in: Tensor | None, scale_down: Tensor | None) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(gate.shape[1], gate.shape[0], bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(gate)
        self.w_gate_up = nn.Parameter(w_gate_up, requires_grad=False)
        self.w_down = nn.Parameter(w_down, requires_grad=False)
        self.register_buffer("scale_in", scale_in)
        self.register_buffer("scale_down", scale_down)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        flat = x.reshape(-1, x.shape[-1])
        router_logits = self.gate(flat)
        weights, ids = torch.ops.mixbuild.moe_gate(router_logits, self.top_k, True)
        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        hidden = flat.float()
        flat_ids = ids.reshape(-1).long()
        flat_w = weights.reshape(-1).float()
        for e in range(self.w_gate_up.shape[0]):
            slots = (flat_ids == e).nonzero().flatten()
            if slots.numel() == 0:
                continue
            tokens = slots // self.top_k
            h = hidden[tokens]
            if self.scale_in is not None:
                h = formats.fake_quantize_fp8(h, self.scale_in[e])
            gate, up = (h @ self.w_gate_up[e].T).chunk(2, dim=-1)
            act = torch.nn.functional.silu(gate) * up
            if self.scale_down is not None:
                act = formats.fake_quantize_fp8(act, self.scale_down[e])
            out.index_add_(0, tokens, (act @ self.w_down[e].T) * flat_w[slots, None])
        return out.to(x.dtype).view_as(x), router_logits, ids


def load_model(path: str | Path, debug: bool = False, verify: bool = True,
               fp8_expert_inputs: bool = True, layout: Layout = Layout.CONCAT):
    """mixbuild's reference model of `layout` (MixtralModel or ServingMixtralModel, float32,
    CPU) holding the dequantized checkpoint, its quantized linears and experts replaced by
    QuantLinear / QuantSparseMoE.

    `fp8_expert_inputs=False` leaves the fp8 experts' inputs unquantized (W8A16 experts), which
    is what transformers 5.24 + compressed-tensors computes on the CPU: it dequantizes the fused
    experts at load time and has no activation quantization for them (its attention
    projections do apply their static input scales). For comparisons with that library only."""
    from mixbuild.model.reference import model_class

    path = Path(path)
    manifest = read_manifest(path, verify)
    spec, scheme, group = manifest.spec, manifest.scheme, manifest.group_size
    read = _Tensors(path)
    with torch.device("meta"):
        model = model_class(layout)(spec, debug=debug)
    model.to_empty(device="cpu")
    model.float()
    with torch.no_grad():
        model.embed.weight.copy_(read(tensor_name("embed")).float())
        model.norm.weight.copy_(read(tensor_name("final_norm")).float())
        lm_head = tensor_name("embed" if spec.tie_word_embeddings else "lm_head")
        model.lm_head.weight.copy_(read(lm_head).float())
        for i, layer in enumerate(model.layers):
            layer.input_norm.weight.copy_(read(tensor_name("input_norm", i)).float())
            layer.post_norm.weight.copy_(read(tensor_name("post_norm", i)).float())
            for proj in _ATTN:
                old = getattr(layer.attn, proj)
                prefix = tensor_name(proj, i).removesuffix(".weight")
                w, act = scheme.hf_dequantize(read, prefix, (old.out_features, old.in_features),
                                              group, _HINT)
                setattr(layer.attn, proj, QuantLinear(w, act))
            layer.moe = _experts(read, spec, i, scheme, group, fp8_expert_inputs)
    return model.eval()


def _experts(read: _Tensors, spec: MixtralSpec, i: int, scheme: Scheme,
             group: int | None, act_quant: bool = True) -> QuantSparseMoE:
    h, inter = spec.hidden_size, spec.intermediate_size
    gate_up, down, s_in, s_down = [], [], [], []

    def linear(role: str, e: int, shape: tuple[int, int]):
        prefix = tensor_name(role, i, e).removesuffix(".weight")
        return scheme.hf_dequantize(read, prefix, shape, group, _HINT)
    for e in range(spec.num_experts):
        w1, a1 = linear("w1", e, (inter, h))
        w3, _ = linear("w3", e, (inter, h))
        w2, a2 = linear("w2", e, (h, inter))
        gate_up.append(torch.cat([w1, w3]))
        down.append(w2)
        s_in.append(a1)
        s_down.append(a2)
    static = scheme.quantizes_activations and act_quant
    return QuantSparseMoE(read(tensor_name("router", i)).float(), torch.stack(gate_up),
                          torch.stack(down), spec.top_k,
                          torch.stack(s_in) if static else None,
                          torch.stack(s_down) if static else None)


def load_runner(path: str | Path, debug: bool = False, verify: bool = True,
                fp8_expert_inputs: bool = True):
    """The Runner (mixbuild.runtime.torch_runner.TorchRunner: concat-layout feeds and outputs,
    float32 on the CPU; `debug` adds the per-layer router logits, chosen experts and hidden
    states) of a quantized Hugging Face checkpoint written by mixbuild."""
    from mixbuild.runtime.torch_runner import TorchRunner

    runner = TorchRunner(load_model(path, debug=debug, verify=verify,
                                    fp8_expert_inputs=fp8_expert_inputs))
    runner.name = "torch-hf-quantized"
    return runner
