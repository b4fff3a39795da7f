"""The interface every weight scheme implements, and the float scheme (nothing quantized).

A scheme is everything one weight format means across the stages, in one object:

- quantizer: its GPTQ column quantizer and encoder (`columns`), its dequantization
  (`dequantize`), the spec sizes it needs (`check_spec`), its calibration defaults;
- ONNX graph: the layout and initializers of a quantized linear (`linear_*`) and of the
  experts (`expert_*`), the activation quantization (`activation_scale`), and the
  MoEExperts function body that dequantizes as the plugins do (`onnx_dequantize`,
  `onnx_activation`);
- Hugging Face hand-off: its compressed-tensors config group, the tensors of one linear, and
  reading them back (`hf_*`);
- ONNX Runtime: the session entries and the private graph rewrite that picks the fast kernels
  (`ort_*`).

The stages hold no branch on the precision: they ask the scheme. `config` below is a
mixbuild.quant.config.QuantConfig; `b` an mixbuild.exporter.functions.FunctionBody (the
builder of a function body, `b(op, *inputs, **attrs)` -> output name, `b.const(value)`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from mixbuild.contract import ExportFormat, QuantScheme
from mixbuild.errors import CheckpointError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mixbuild.model.spec import MixtralSpec
    from mixbuild.quant.config import QuantConfig


class Scheme:
    """The float scheme: weights stored in the graph's float type, nothing quantized. Every
    quantized scheme subclasses it and overrides what its format changes."""

    name = "float"
    moe = QuantScheme.NONE          # the MoEExperts node's `quantization` attribute
    quantized = False
    quantizes_activations = False   # static per-tensor activation scales (W8A8)
    smoothing = False               # AWQ scale search applies (--int4-method awq)
    quantized_head = False          # --lm-head int8 | int4 goes with it
    grouped = False                 # scales per group of --group-size weights along K
    # calibration defaults (docs/precision.md: measured on the fixture)
    propagate = False               # calibrate layer i + 1 on quantized layer i's output
    routed_weight = 0.9             # an expert's Hessian share from its routed tokens
    hf_formats: tuple[ExportFormat, ...] = ()
    expert_inputs: tuple[str, ...] = ()   # MoEExperts inputs after w_down, in order
    # TensorRT: the lowest compute capability that runs the format (measured with the
    # TensorRT-RTX 1.7 builder, whose code generator refuses the data type below it), why, and
    # the lowest version of each backend ("tensorrt", "tensorrt-rtx") that imports its ops
    trt_min_sm: tuple[int, int] | None = None
    trt_min_sm_why = ""
    trt_min_version: ClassVar[dict[str, tuple[int, int]]] = {}
    trt_ops = ""

    def __repr__(self) -> str:
        return f"<scheme {self.name}>"

    # ------------------------------------------------------------------------ quantizer
    def columns(self, w: torch.Tensor, config: QuantConfig, order: torch.Tensor | None = None):
        """The GPTQ column quantizer of W [N, K]: called on (column, k, W) it returns the
        column rounded to the format; `encode(W_rounded)` -> (q, scale) in
        mixbuild.plugins.formats layout. `order`: the visiting position -> the column."""
        raise TypeError(f"the {self.name} scheme stores no quantized weights")

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, config: QuantConfig) -> torch.Tensor:
        """float32 [E, N, K] of codes [E, N, K(/2)] and scales in formats layout."""
        raise TypeError(f"the {self.name} scheme stores no quantized weights")

    def check_spec(self, spec: MixtralSpec, config: QuantConfig) -> None:
        """Refuse (UsageError) a model this format cannot quantize, before any work."""

    def group_size(self, config: QuantConfig) -> int:
        """The MoEExperts node's `group_size` attribute (0: not group-wise)."""
        return config.group_size if self.grouped else 0

    # ----------------------------------------------------------------------- ONNX graph
    def linear_layout(self, q: torch.Tensor, scale: torch.Tensor):
        """(q, scale) of a linear stored [N, K] -> the MatMul layout [K, N] the graph holds."""
        raise TypeError(f"the {self.name} scheme stores no quantized weights")

    linear_weight_type: Any = None   # torch dtype of the [K, N] weight ("int4": ONNX INT4)

    def linear_scale(self, n: int, k: int, config: QuantConfig) -> tuple[list[int], dict]:
        """(shape of the linear's scale initializer, DequantizeLinear attributes)."""
        raise TypeError(f"the {self.name} scheme stores no quantized weights")

    expert_weight_type: Any = None   # torch dtype of the [E, N, K] expert weights

    def expert_scale(self, e: int, n: int, k: int, config: QuantConfig):
        """(shape, torch dtype) of the experts' scale initializer."""
        raise TypeError(f"the {self.name} scheme stores no quantized weights")

    def activation_scale(self, amax: float) -> float:
        """The static activation scale of a calibrated absolute maximum."""
        raise TypeError(f"the {self.name} scheme quantizes no activations")

    def onnx_dequantize(self, b, weight: str, scale: str, k: int, config: QuantConfig) -> str:
        """The body's float32 [E, N, K] of an expert weight input and its scale input."""
        return weight

    def onnx_activation(self, b, x: str, which: str, expert: int) -> str:
        """The activation entering GEMM `which` ('gate_up' or 'down') of `expert`."""
        return x

    # -------------------------------------------------------------- Hugging Face hand-off
    def check_hf(self, fmt: ExportFormat, config: QuantConfig) -> None:
        """Refuse (UsageError) a Hugging Face format this scheme cannot be written in."""
        if fmt not in self.hf_formats:
            raise UsageError(f"--format {fmt.value} writes {_WRITES.get(fmt, fmt.value)}: it "
                             f"cannot hold {self.name} weights",
                             expected=" | ".join(f"--format {f.value}" for f in self.hf_formats)
                             + f" with --precision {self.name}",
                             found=f"--format {fmt.value} with --precision {self.name}",
                             hint="pick one of the formats above, or --format onnx")

    def check_hf_spec(self, spec: MixtralSpec) -> None:
        """Refuse (UsageError) a model whose sizes the Hugging Face format cannot pack."""

    def compressed_tensors(self, config: QuantConfig) -> tuple[dict, dict | None, str]:
        """(weights, input_activations, format) of compressed-tensors' config group."""
        raise TypeError(f"the {self.name} scheme has no compressed-tensors form")

    def hf_linear(self, prefix: str, q, scale, act_scale: float | None, fmt: ExportFormat,
                  config: QuantConfig, dtype) -> dict[str, torch.Tensor]:
        """The on-disk tensors of one linear [N, K] (q / scale in formats layout)."""
        raise TypeError(f"the {self.name} scheme has no Hugging Face form")

    def hf_group_size(self, quantization_config: dict) -> int | None:
        """The group size a checkpoint's quantization_config records (None: not grouped)."""
        return None

    def hf_dequantize(self, read, prefix: str, shape: tuple[int, int], group: int | None,
                      hint: str):
        """(float32 weight [N, K], static input scale or None) of one linear written by
        `hf_linear`; `read(name)` returns a stored tensor."""
        raise TypeError(f"the {self.name} scheme has no Hugging Face form")

    # -------------------------------------------------------------------- ONNX Runtime
    def ort_session(self, accuracy_level: int, fast: bool) -> tuple[dict[str, str], dict[str, str]]:
        """(session config entries, kernels chosen: what -> description)."""
        return {}, {}

    def ort_rewrites(self, fast: bool) -> bool:
        """Whether `ort_rewrite` changes the session's graph."""
        return False

    def ort_rewrite(self, model, directory, act_dtype, accuracy_level: int, head: Scheme,
                    on_cpu: bool):
        """Rewrite the in-memory ONNX `model` for ONNX Runtime's fast kernels; returns
        (mixbuild.schemes.ort.Rewrite, kernels chosen). `head`: lm_head's scheme."""
        from mixbuild.schemes.ort import Rewrite

        return Rewrite(), {}

    def ort_head(self, model, directory, act_dtype, accuracy_level: int, on_cpu: bool,
                 out) -> dict[str, str]:
        """As `ort_rewrite`, for lm_head stored in this scheme; adds to the Rewrite `out`."""
        return {}


FLOAT = Scheme()

# The first TensorRT / TensorRT-RTX versions whose ONNX parser imports FP8 and INT4 Q/DQ
QDQ_VERSIONS: dict[str, tuple[int, int]] = {"tensorrt": (10, 0), "tensorrt-rtx": (1, 0)}

_WRITES = {ExportFormat.HF: "compressed-tensors checkpoints",
           ExportFormat.HF_MODELOPT: "NVIDIA's unified FP8 format only"}


def _invalid(scale):
    """(scale as float32, its values that are not finite and positive)."""
    import torch

    s = scale.float()
    return s, s[~(torch.isfinite(s) & (s > 0))]


def positive(name: str, scale, hint: str):
    """A scale read from a checkpoint as float32, refused (CheckpointError) unless finite and
    positive everywhere."""
    s, bad = _invalid(scale)
    if bad.numel():
        raise CheckpointError(f"invalid quantization scale {name}",
                              expected="finite, positive values",
                              found=f"min {float(s.min())}, max {float(s.max())}", hint=hint)
    return s


def check_scale(name: str, scale) -> None:
    """Every scale written must be finite and positive: a NaN, Inf or non-positive scale (a
    corrupt weight, a calibration that overflowed) would load silently and produce garbage."""
    s, bad = _invalid(scale)
    if bad.numel():
        raise CheckpointError(f"quantization produced an invalid scale for {name}",
                              expected="finite, positive scales",
                              found=f"{bad.numel()} of {s.numel()} values invalid "
                                    f"(e.g. {float(bad.flatten()[0])})",
                              hint="check the checkpoint's weights with `mixbuild inspect`; "
                                   "re-export from an intact checkpoint")
