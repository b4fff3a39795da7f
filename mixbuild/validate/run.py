"""`mixbuild validate`: a model directory, run by a runtime backend, against transformers on the
checkpoint it came from.

The backend decides what the model directory is: an artifact for `ort` (ONNX Runtime, CPU or
CUDA provider), an engine for `trt`, a Hugging Face checkpoint for `torch` (mixbuild's reference
model; on CUDA its MoE runs the Triton kernels, which is what validating it proves). `auto`
picks the backend from the directory's files, as `mixbuild run` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mixbuild.contract import Backend, Device, DType, Precision
from mixbuild.errors import MissingDependencyError, UsageError, choice
from mixbuild.model.checkpoint import Checkpoint
from mixbuild.model.spec import MixtralSpec


@dataclass
class _Opened:
    """A model directory opened for validation by one backend."""

    runner: object
    spec: MixtralSpec
    precision: Precision
    kv_dtype: object
    tokenizer_dir: Path
    debug: bool                      # the runner emits debug.{i}.* outputs
    expert_loader: object = None     # layer -> (w_gate_up, w_down) as the runner computes them


def validate_artifact(artifact_dir: str | Path, reference: str | Path, out: str | Path | None = None,
                      prompts: str | Path | None = None, max_tokens: int = 128, steps: int = 16,
                      max_sequences: int | None = 8, batch_size: int = 4,
                      overrides: dict[str, float] | None = None, plot: bool = True,
                      progress: bool = True, overwrite: bool = False, backend: str = "auto",
                      device: str = "cpu", dtype: str | None = None):
    """Validate; returns (report, report_dir or None). A report directory that would be refused
    (mixbuild.atomic.check_destination) is refused before any work is done.

    backend: auto | ort | torch | trt (what `artifact_dir` is; see the module docstring);
    device: cpu | cuda; dtype: the torch backend's compute dtype (fp32 | fp16 | bf16, default
    fp32), which is also the precision whose tolerances apply; other backends refuse it.
    """
    from mixbuild.atomic import check_destination
    from mixbuild.validate.compare import validate
    from mixbuild.validate.data import evaluation_batches
    from mixbuild.validate.experts import ExpertWeightPair, checkpoint_expert_weights
    from mixbuild.validate.hf_runner import HFRunner
    from mixbuild.validate.report import write_report
    from mixbuild.validate.tolerances import load_tolerances

    inputs = [p for p in (artifact_dir, reference, prompts) if p is not None]
    if out is not None:
        check_destination(out, overwrite, "report", inputs)
    ckpt = Checkpoint(reference)
    opened = _open(Path(artifact_dir), choice(Backend, backend, "backend"),
                   choice(Device, device, "device"), dtype)
    if ckpt.spec.replace(dtype=opened.spec.dtype) != opened.spec:
        raise UsageError(f"the {opened.runner.name} model was not made from this checkpoint",
                         expected=f"a checkpoint with the model's spec ({opened.spec.num_layers} "
                                  f"layers, hidden {opened.spec.hidden_size}, "
                                  f"{opened.spec.num_experts} experts)",
                         found=f"{ckpt.spec.num_layers} layers, hidden {ckpt.spec.hidden_size}, "
                               f"{ckpt.spec.num_experts} experts")
    tokenizer = opened.tokenizer_dir / "tokenizer.json"
    if not tokenizer.is_file():
        tokenizer = ckpt.path / "tokenizer.json"
    batches = evaluation_batches(tokenizer, prompts, max_tokens=max_tokens, batch_size=batch_size,
                                 bos_id=ckpt.spec.bos_token_id, max_sequences=max_sequences)
    debug = opened.debug
    hf = HFRunner(ckpt.path, router_logits=debug, hidden_states=debug, moe_inputs=debug)
    experts = None
    if debug and opened.expert_loader is not None:
        experts = ExpertWeightPair(checkpoint_expert_weights(ckpt.path), opened.expert_loader)
    report = validate(hf, opened.runner, opened.spec, batches, steps,
                      load_tolerances(opened.precision, overrides), experts,
                      artifact_kv_dtype=opened.kv_dtype, progress=progress)
    report_dir = (write_report(report, out, plot=plot, overwrite=overwrite, inputs=inputs)
                  if out is not None else None)
    return report, report_dir


def _open(path: Path, backend: Backend, device: Device, dtype: str | None) -> _Opened:
    from mixbuild.runtime.api import detect_backend

    found = detect_backend(path)
    chosen = found if backend is Backend.AUTO else backend
    if chosen is not found:
        raise UsageError(f"the {chosen.value} backend cannot validate {path}",
                         expected=_OPENS[chosen], found=f"{path} is {_OPENS[found]}",
                         hint=f"pass --backend {found.value} (or auto)")
    if dtype is not None and chosen is not Backend.TORCH:
        raise UsageError(f"--dtype has no effect with the {chosen.value} backend",
                         expected="--dtype only with --backend torch",
                         found=f"--dtype {dtype}",
                         hint=f"drop --dtype: the {chosen.value} backend runs the dtype the "
                              "model was exported or built with")
    if device is Device.CUDA:
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for, but torch sees no CUDA GPU",
                             hint="pass --device cpu (ort or torch backends)")
    return _OPENERS[chosen](path, device, dtype)


_OPENS = {Backend.ORT: "an ONNX artifact directory (mixbuild.json + model.onnx)",
          Backend.TORCH: "a Hugging Face checkpoint directory (config.json + *.safetensors)",
          Backend.TRT: "a TensorRT engine directory (engine.plan + engine.json)"}


def _open_ort(path: Path, device: Device, dtype: str | None) -> _Opened:
    from mixbuild.exporter.artifact import Artifact
    from mixbuild.exporter.weights import ArtifactWeights
    from mixbuild.runtime.ort_runner import OrtRunner

    providers = ["CPUExecutionProvider"]
    if device is Device.CUDA:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise MissingDependencyError("onnxruntime-gpu", "gpu",
                                         "validating on the ort backend with --device cuda")
        providers = ["CUDAExecutionProvider", *providers]
    artifact = Artifact.open(path)
    runner = OrtRunner(artifact, providers=providers)
    debug = bool(artifact.manifest.get("debug_outputs"))
    return _Opened(runner, artifact.spec, Precision.parse(artifact.precision), runner.kv_dtype,
                   artifact.path, debug, ArtifactWeights(artifact).experts if debug else None)


def _open_torch(path: Path, device: Device, dtype: str | None) -> _Opened:
    import numpy as np

    from mixbuild.runtime.torch_runner import TorchRunner
    from mixbuild.validate.experts import torch_expert_weights

    compute = DType.parse(dtype or "fp32")
    runner = TorchRunner.from_checkpoint(path, dtype=compute.torch, debug=True, device=device.value)
    # float32 feeds: the runner casts the past KV to its dtype (numpy has no bfloat16)
    return _Opened(runner, runner.spec, Precision.of_dtype(compute), np.float32, path, True,
                   torch_expert_weights(runner))


def _open_trt(path: Path, device: Device, dtype: str | None) -> _Opened:
    from mixbuild.runtime.trt_runner import TrtRunner

    if device is Device.CPU:
        raise UsageError("the trt backend runs TensorRT engines on a CUDA GPU",
                         found="--device cpu", hint="pass --device cuda")
    runner = TrtRunner(path)   # checks the manifest and the TensorRT import first
    return _Opened(runner, runner.spec, Precision.parse(runner.manifest["precision"]), runner.kv_dtype,
                   path, False)


_OPENERS = {Backend.ORT: _open_ort, Backend.TORCH: _open_torch, Backend.TRT: _open_trt}
