"""The artifact and engine formats in one place: every file, tensor, op and constant name, and
the one vocabulary of dtypes, precisions and backends.

Producers (exporter, quant, builder) and consumers (runtime, validate, inspect) take names from
here and never spell them. This module imports only the standard library and mixbuild.errors;
torch and numpy are imported lazily by the accessors that return their types. The full
contract, input by input, is docs/contract.md.

Shape legend (as in mixbuild/model/spec.py): B batch, S new tokens, P past tokens, T = B*S,
V vocab, H hidden, E experts, k top-k, Nkv kv heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from mixbuild.errors import ConfigError, UsageError, choice

if TYPE_CHECKING:  # pragma: no cover
    from mixbuild.model.spec import MixtralSpec

# ------------------------------------------------------------------------------------- files

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"            # external data of model.onnx
MANIFEST_FILE = "mixbuild.json"           # the artifact manifest
SMOOTHING_FILE = "smoothing.safetensors"  # AWQ smoothing factors of a quantized artifact
EXPERT_LOAD_PLOT = "expert_load.png"      # calibration routing of a quantized artifact
GENAI_CONFIG_FILE = "genai_config.json"   # onnxruntime-genai's model config (concat layout)
HF_CONFIG_FILE = "config.json"            # the checkpoint's Hugging Face config (concat layout)
PLAN_FILE = "engine.plan"
ENGINE_MANIFEST_FILE = "engine.json"
REPORT_FILE = "report.json"              # a validation report (with report.md, report.png)
REPORT_SCHEMA = "mixbuild.validate/1"
ARTIFACT_KIND, ENGINE_KIND = "artifact", "engine"
ARTIFACT_FORMAT_VERSION = 1
ENGINE_FORMAT_VERSION = 2                 # 2: "backend" is the EngineBackend value

# A quantized Hugging Face checkpoint (`mixbuild export --format hf | hf-modelopt`,
# mixbuild/exporter/hf.py; docs/precision.md, "Quantized Hugging Face checkpoints")
HF_MANIFEST_FILE = "mixbuild_checkpoint.json"   # what mixbuild wrote: calibration, sha256 of files
HF_CHECKPOINT_KIND = "hf-checkpoint"
HF_FORMAT_VERSION = 1
HF_INDEX_FILE = "model.safetensors.index.json"  # the shard index transformers and vLLM read
HF_GENERATION_FILE = "generation_config.json"
HF_MODELOPT_CONFIG_FILE = "hf_quant_config.json"  # NVIDIA's unified format (TensorRT-LLM, vLLM)
HF_WEIGHTS_FILE = "model.safetensors"           # an unsharded checkpoint's weights
TOKENIZER_FILE = "tokenizer.json"               # the `tokenizers` library's file, copied to artifacts
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # its special tokens and chat template
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
REPORT_PLOT_FILE = "report.png"                 # a validation report's picture


class ExportFormat(str, Enum):
    """What `mixbuild export --format` writes."""

    ONNX = "onnx"                      # the ONNX artifact (the default)
    HF = "hf"                          # Hugging Face checkpoint, compressed-tensors quantization
    HF_MODELOPT = "hf-modelopt"        # Hugging Face checkpoint, NVIDIA unified (ModelOpt) FP8

    @classmethod
    def parse(cls, value) -> ExportFormat:
        return choice(cls, value, "export format")

# -------------------------------------------------------------------------------------- ONNX

OPSET = 21                      # blocked DequantizeLinear (int4) needs 21
SERVING_OPSET = 24              # the serving layout's TensorScatter needs 24
DOMAIN = "mixbuild"             # custom-op domain of MoEGate / MoEExperts
DOMAIN_VERSION = 1
GATE_OP = "MoEGate"
EXPERTS_OP = "MoEExperts"
MOE_OPS = (GATE_OP, EXPERTS_OP)
PLUGIN_NAMESPACE = "mixbuild"   # TensorRT plugin namespace the MoE nodes name
PLUGIN_VERSION = "1"


class QuantScheme(str, Enum):
    """Weight format of the MoE experts (the `quantization` attribute of MoEExperts)."""

    NONE = "none"
    FP8 = "fp8"
    INT4 = "int4"

    @classmethod
    def parse(cls, value: QuantScheme | str) -> QuantScheme:
        return choice(cls, value, "MoE quantization scheme")


class Layout(str, Enum):
    """How an artifact's KV cache crosses the graph boundary (docs/contract.md)."""

    CONCAT = "concat"     # past in, past+new out (Optimum / onnxruntime-genai names)
    SERVING = "serving"   # one fixed-capacity cache per layer, written in place at per-row
    #                       positions; per-row lengths; last-token logits

    @classmethod
    def parse(cls, value) -> Layout:
        return choice(cls, value, "KV-cache layout")


# ------------------------------------------------------------------------------ tensor names

INPUT_IDS = "input_ids"              # int64 [B, S]
ATTENTION_MASK = "attention_mask"    # int64 [B, P+S]
POSITION_IDS = "position_ids"        # int64 [B, S]
LOGITS = "logits"                    # float32 [B, S, V]
TOKEN_INPUTS = (INPUT_IDS, ATTENTION_MASK, POSITION_IDS)
# the serving layout
CACHE_LENGTHS = "cache_lengths"      # int64 [B]: valid positions in row b's cache = where its new
#                                      tokens are written
INPUT_LENGTHS = "input_lengths"      # int64 [B]: valid tokens of row b in input_ids (right-padded;
#                                      0 for an idle row)
SERVING_INPUTS = (INPUT_IDS, POSITION_IDS, CACHE_LENGTHS, INPUT_LENGTHS)


def past_key(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key(layer: int) -> str:
    return f"present.{layer}.key"


def present_value(layer: int) -> str:
    return f"present.{layer}.value"


def cache_key(layer: int) -> str:
    return f"cache.{layer}.key"


def cache_value(layer: int) -> str:
    return f"cache.{layer}.value"


def updated_key(layer: int) -> str:
    return f"updated_cache.{layer}.key"


def updated_value(layer: int) -> str:
    return f"updated_cache.{layer}.value"


def cache_pairs(num_layers: int) -> list[tuple[str, str]]:
    """Serving layout: (cache input, updated cache output) per cache tensor, in graph order. A
    runtime binds both names of a pair to one buffer, so the update happens in place."""
    return [pair for i in range(num_layers)
            for pair in ((cache_key(i), updated_key(i)), (cache_value(i), updated_value(i)))]


def kv_pairs(num_layers: int) -> list[tuple[str, str]]:
    """(past input, present output) for every cache tensor, in graph order (key, value per layer)."""
    return [pair for i in range(num_layers)
            for pair in ((past_key(i), present_key(i)), (past_value(i), present_value(i)))]


def kv_inputs(num_layers: int) -> list[str]:
    return [past for past, _ in kv_pairs(num_layers)]


def kv_outputs(num_layers: int) -> list[str]:
    return [present for _, present in kv_pairs(num_layers)]


def is_kv_input(name: str) -> bool:
    return name.startswith(("past_key_values.", "cache."))


class Debug(str, Enum):
    """Per-layer diagnostic outputs: exported on request (the first three) for the validator;
    MOE_INPUT only comes from the transformers reference runner."""

    ROUTER_LOGITS = "router_logits"   # activation dtype [T, E] (MoEGate's input)
    EXPERT_IDS = "expert_ids"         # int32 [T, k]
    HIDDEN = "hidden"                 # activation dtype [B, S, H]: the layer's output
    MOE_INPUT = "moe_input"           # [T, H]: what the layer's MoE block sees

    def name_for(self, layer: int) -> str:
        return f"debug.{layer}.{self.value}"

    @classmethod
    def exported(cls) -> tuple[Debug, ...]:
        return cls.ROUTER_LOGITS, cls.EXPERT_IDS, cls.HIDDEN


def input_names(num_layers: int) -> list[str]:
    return [*TOKEN_INPUTS, *kv_inputs(num_layers)]


def output_names(num_layers: int) -> list[str]:
    return [LOGITS, *kv_outputs(num_layers)]


def debug_output_names(num_layers: int) -> list[str]:
    return [kind.name_for(i) for i in range(num_layers) for kind in Debug.exported()]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, element type (numpy spelling) and dims (ints, or
    the symbolic names batch / seq / past_seq / total_seq / tokens)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype}


def io_specs(spec: MixtralSpec, kv_dtype: DType, debug: bool = False,
             layout: Layout = Layout.CONCAT, all_logits: bool = False
             ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Every input and output of an artifact of `spec`, in graph order."""
    if layout is Layout.SERVING:
        return _serving_io(spec, kv_dtype, debug, all_logits)
    kv, nkv, d = kv_dtype.value, spec.num_kv_heads, spec.head_dim
    inputs = [TensorSpec(INPUT_IDS, "int64", ("batch", "seq")),
              TensorSpec(ATTENTION_MASK, "int64", ("batch", "total_seq")),
              TensorSpec(POSITION_IDS, "int64", ("batch", "seq"))]
    inputs += [TensorSpec(n, kv, ("batch", nkv, "past_seq", d)) for n in kv_inputs(spec.num_layers)]
    outputs = [TensorSpec(LOGITS, "float32", ("batch", "seq", spec.vocab_size))]
    outputs += [TensorSpec(n, kv, ("batch", nkv, "total_seq", d))
                for n in kv_outputs(spec.num_layers)]
    if debug:
        outputs += _debug_specs(spec, kv)
    return inputs, outputs


def _debug_specs(spec: MixtralSpec, kv: str) -> list[TensorSpec]:
    kinds = {Debug.ROUTER_LOGITS: (kv, ("tokens", spec.num_experts)),
             Debug.EXPERT_IDS: ("int32", ("tokens", spec.top_k)),
             Debug.HIDDEN: (kv, ("batch", "seq", spec.hidden_size))}
    return [TensorSpec(kind.name_for(i), *kinds[kind])
            for i in range(spec.num_layers) for kind in Debug.exported()]


def _serving_io(spec: MixtralSpec, kv_dtype: DType, debug: bool, all_logits: bool
                ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    kv, nkv, d = kv_dtype.value, spec.num_kv_heads, spec.head_dim
    cache = ("batch", nkv, "capacity", d)
    inputs = [TensorSpec(INPUT_IDS, "int64", ("batch", "seq")),
              TensorSpec(POSITION_IDS, "int64", ("batch", "seq")),
              TensorSpec(CACHE_LENGTHS, "int64", ("batch",)),
              TensorSpec(INPUT_LENGTHS, "int64", ("batch",))]
    inputs += [TensorSpec(name, kv, cache) for name, _ in cache_pairs(spec.num_layers)]
    logits = ("batch", "seq", spec.vocab_size) if all_logits else ("batch", spec.vocab_size)
    outputs = [TensorSpec(LOGITS, "float32", logits)]
    outputs += [TensorSpec(name, kv, cache) for _, name in cache_pairs(spec.num_layers)]
    return inputs, outputs + (_debug_specs(spec, kv) if debug else [])


# ---------------------------------------------------------------- dtypes, precisions, backends

class DType(str, Enum):
    """Activation / weight storage dtype of a checkpoint or an unquantized artifact."""

    FP32 = "float32"
    FP16 = "float16"
    BF16 = "bfloat16"

    @property
    def nbytes(self) -> int:
        return 4 if self is DType.FP32 else 2

    @property
    def short(self) -> str:
        return {DType.FP32: "fp32", DType.FP16: "fp16", DType.BF16: "bf16"}[self]

    @property
    def torch(self):
        import torch

        return getattr(torch, self.value)

    @property
    def numpy(self):
        """The numpy dtype (ml_dtypes' bfloat16 for BF16)."""
        if self is DType.BF16:
            import ml_dtypes

            return ml_dtypes.bfloat16
        import numpy as np

        return np.dtype(self.value).type

    @classmethod
    def parse(cls, value) -> DType:
        """'fp32', 'float32', 'torch.float32', 'half', 'bf16', ... -> DType (ConfigError otherwise)."""
        aliases = {"fp32": cls.FP32, "float": cls.FP32, "fp16": cls.FP16, "half": cls.FP16,
                   "bf16": cls.BF16}
        text = str(getattr(value, "value", value)).removeprefix("torch.")
        if text in aliases:
            return aliases[text]
        try:
            return cls(text)
        except ValueError as exc:
            raise ConfigError(f"unsupported dtype '{value}'",
                              expected="float32, float16 or bfloat16 (fp32, fp16, bf16)",
                              found=str(value)) from exc


class Precision(str, Enum):
    """What an artifact's weights are: a float dtype, or a quantized format."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"     # W8A8 E4M3, static activation scales
    INT4 = "int4"   # W4A16, symmetric, group-wise

    @property
    def quantized(self) -> bool:
        return self in (Precision.FP8, Precision.INT4)

    @property
    def bytes_per_weight(self) -> float:
        """Storage per weight; int4 includes one fp16 scale per 128-weight group."""
        return {Precision.FP32: 4.0, Precision.FP16: 2.0, Precision.BF16: 2.0,
                Precision.FP8: 1.0, Precision.INT4: 0.5 + 2.0 / 128}[self]

    @classmethod
    def of_dtype(cls, dtype: DType) -> Precision:
        return cls(dtype.short)

    @classmethod
    def parse(cls, value) -> Precision:
        aliases = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
        text = str(getattr(value, "value", value)).lower()
        return choice(cls, aliases.get(text, text), "precision")


def quantized_precision(value) -> Precision:
    """A precision that must be fp8 or int4 (a UsageError otherwise)."""
    precision = Precision.parse(value)
    if not precision.quantized:
        raise UsageError(f"precision '{precision.value}' is not a quantized format",
                         expected="fp8 | int4", found=precision.value)
    return precision


# ONNX Runtime's int4 kernels (MatMulNBits, QMoE): the `accuracy_level`s its CPU provider
# implements, i.e. the activation type of the products (mixbuild/schemes/ort.py)
ACCURACY_LEVELS = {1: "float32 activations, the contract's W4A16",
                   4: "int8 activations, block-wise: llama.cpp's Q4_0 x Q8_0 numerics"}
ACCURACY_LEVEL_HELP = ("ort backend, int4 artifacts: the activation type of ONNX Runtime's int4 "
                       "kernels (MatMulNBits, QMoE). 1: float32, the contract's W4A16; 4: int8 "
                       "activations (faster; other numerics: validate with it).")


class Backend(str, Enum):
    """The runtime backend that runs a model directory."""

    AUTO = "auto"
    ORT = "ort"       # ONNX Runtime on an artifact directory
    TORCH = "torch"   # the reference model on a checkpoint directory
    TRT = "trt"       # an engine directory (TensorRT or TensorRT-RTX)


class Device(str, Enum):
    """Where a runtime backend runs."""

    CPU = "cpu"
    CUDA = "cuda"


class EngineBackend(str, Enum):
    """The TensorRT flavour that builds (and must run) an engine: the `--backend` of
    `mixbuild engine` and the `backend` of engine.json."""

    TENSORRT = "tensorrt"
    TENSORRT_RTX = "tensorrt-rtx"

    @property
    def module(self) -> str:
        """The Python module that provides it."""
        return {EngineBackend.TENSORRT: "tensorrt", EngineBackend.TENSORRT_RTX: "tensorrt_rtx"}[self]

    @property
    def extra(self) -> str:
        """The pip extra that installs it: mixbuild[trt] / mixbuild[trt-rtx]."""
        return {EngineBackend.TENSORRT: "trt", EngineBackend.TENSORRT_RTX: "trt-rtx"}[self]

    @property
    def label(self) -> str:
        return {EngineBackend.TENSORRT: "TensorRT", EngineBackend.TENSORRT_RTX: "TensorRT-RTX"}[self]

    @classmethod
    def parse(cls, value) -> EngineBackend:
        return choice(cls, value, "TensorRT backend")
