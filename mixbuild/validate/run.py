"""`mixbuild validate`: a model directory, run by a runtime backend, against transformers on the
checkpoint it came from.

The backend decides what the model directory is: an artifact for `ort` (ONNX Runtime, CPU or
CUDA provider), an engine for `trt`, a Hugging Face checkpoint for `torch` (mixbuild's reference
model; on CUDA its MoE runs the Triton kernels, which is what validating it proves). `auto`
picks the backend from the directory's files, as `mixbuild run` does.

An ort artifact always gets the full diagnostics (router logits, chosen experts, MoE inputs
and hidden states of every layer; all-position logits on the serving layout): its session
loads a private in-memory copy of the graph with those values added as outputs
(mixbuild/validate/diagnostics.py), through the same OrtRunner, session options and runtime
rewrites as `mixbuild run`; the artifact's files are never written. Serving-layout artifacts
are driven by mixbuild/validate/passes.py (ServingModel; the greedy pass is ServingStep).

Several artifacts (`validate_artifacts`) are judged against one reference on the same tokens;
each gets its own report, and one table and plot compare them (report.compare_*).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mixbuild.contract import TOKENIZER_FILE, Backend, Device, DType, Layout, Precision
from mixbuild.errors import MissingDependencyError, UsageError, choice
from mixbuild.model.checkpoint import Checkpoint
from mixbuild.model.spec import MixtralSpec
from mixbuild.runtime.opener import ModelDir, ModelKind


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
    model: object = None             # what compare.validate drives (default: the runner)


def validate_artifact(artifact_dir: str | Path, reference: str | Path, out: str | Path | None = None,
                      prompts: str | Path | None = None, max_tokens: int = 128, steps: int = 16,
                      max_sequences: int | None = 8, batch_size: int = 4,
                      overrides: dict[str, float] | None = None, plot: bool = True,
                      progress: bool = True, overwrite: bool = False, backend: str = "auto",
                      device: str = "cpu", dtype: str | None = None, long: int | None = None,
                      chunk: int | None = None, accuracy_level: int = 1):
    """Validate; returns (report, report_dir or None). A report directory that would be refused
    (mixbuild.atomic.check_destination) is refused before any work is done.

    backend: auto | ort | torch | trt (what `artifact_dir` is; see the module docstring);
    device: cpu | cuda; dtype: the torch backend's compute dtype (fp32 | fp16 | bf16, default
    fp32), which is also the precision whose tolerances apply; other backends refuse it.
    long: evaluate on sequences of `long` tokens (the text repeated as needed, at most the
    model's context), one per batch, compared `chunk` tokens at a time (default 256) through
    the KV cache; chunk alone chunks the ordinary evaluation batches.
    accuracy_level: the ort backend's int4 kernels' activation type (mixbuild.runtime.load);
    the report records the kernels that ran.
    """
    (_, report), = _validate_many([artifact_dir], reference, prompts, max_tokens, steps,
                                     max_sequences, batch_size, overrides, progress, backend,
                                     device, dtype, long, chunk, out, overwrite, accuracy_level)
    report_dir = None
    if out is not None:
        from mixbuild.validate.report import write_report

        report_dir = write_report(report, out, plot=plot, overwrite=overwrite,
                                  inputs=_inputs([artifact_dir], reference, prompts))
    return report, report_dir


def validate_artifacts(artifact_dirs, reference: str | Path, out: str | Path | None = None,
                       prompts: str | Path | None = None, max_tokens: int = 128, steps: int = 16,
                       max_sequences: int | None = 8, batch_size: int = 4,
                       overrides: dict[str, float] | None = None, plot: bool = True,
                       progress: bool = True, overwrite: bool = False, backend: str = "auto",
                       device: str = "cpu", dtype: str | None = None, long: int | None = None,
                       chunk: int | None = None, accuracy_level: int = 1):
    """Several artifacts against one reference on the same tokens: returns ([(name, report)],
    report_dir or None). `out` gets one report directory per artifact (named after it) and a
    comparison: report.md (one table), report.json and report.png (one plot). Each report is
    what validate_artifact gives for that artifact alone, number for number."""
    artifact_dirs = [Path(a) for a in artifact_dirs]
    if not artifact_dirs:
        raise UsageError("no artifact to validate", expected="one or more ARTIFACT directories")
    results = _validate_many(artifact_dirs, reference, prompts, max_tokens, steps, max_sequences,
                             batch_size, overrides, progress, backend, device, dtype, long, chunk,
                             out, overwrite, accuracy_level)
    report_dir = None
    if out is not None:
        from mixbuild.validate.report import write_comparison

        report_dir = write_comparison(results, out, plot=plot, overwrite=overwrite,
                                      inputs=_inputs(artifact_dirs, reference, prompts))
    return results, report_dir


def _inputs(artifact_dirs, reference, prompts):
    return [p for p in (*artifact_dirs, reference, prompts) if p is not None]


def unique_names(paths) -> list[str]:
    """A short, distinct name per artifact directory (its name; the parent's too on a clash)."""
    names = [Path(p).name or str(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{i}-{n}" for i, n in enumerate(names)]


def _validate_many(artifact_dirs, reference, prompts, max_tokens, steps, max_sequences,
                   batch_size, overrides, progress, backend, device, dtype, long, chunk, out,
                   overwrite, accuracy_level=1):
    from mixbuild.atomic import check_destination
    from mixbuild.validate.compare import validate
    from mixbuild.validate.experts import ExpertWeightPair, checkpoint_expert_weights
    from mixbuild.validate.hf_runner import HFRunner
    from mixbuild.validate.tolerances import load_tolerances

    if out is not None:
        check_destination(out, overwrite, "report", _inputs(artifact_dirs, reference, prompts))
    if long is not None and long < 2:
        raise UsageError("--long needs at least 2 tokens", found=str(long))
    ckpt = Checkpoint(reference)
    backend, device = choice(Backend, backend, "backend"), choice(Device, device, "device")
    opened = [_open(Path(a), backend, device, dtype, accuracy_level) for a in artifact_dirs]
    for path, model in zip(artifact_dirs, opened):
        _check_same_model(ckpt, model, path)
    first = opened[0]
    batches = _batches(first, ckpt, prompts, max_tokens, max_sequences, batch_size, long)
    if long is not None and chunk is None:
        chunk = 256
    debug = any(o.debug for o in opened)
    hf = HFRunner(ckpt.path, router_logits=debug, hidden_states=debug, moe_inputs=debug)
    reference_experts = checkpoint_expert_weights(ckpt.path) if debug else None
    results = []
    for name, model in zip(unique_names(artifact_dirs), opened):
        experts = None
        if model.debug and model.expert_loader is not None:
            experts = ExpertWeightPair(reference_experts, model.expert_loader)
        report = validate(hf, model.model or model.runner, model.spec, batches, steps,
                          load_tolerances(model.precision, overrides), experts,
                          artifact_kv_dtype=model.kv_dtype, progress=progress, chunk=chunk)
        kernels = getattr(model.runner, "kernels", None)
        results.append((name, dataclasses.replace(report, kernels=kernels) if kernels else report))
    return results


def _check_same_model(ckpt: Checkpoint, opened: _Opened, path: Path) -> None:
    if ckpt.spec.replace(dtype=opened.spec.dtype) != opened.spec:
        raise UsageError(f"the {opened.runner.name} model {path} was not made from this checkpoint",
                         expected=f"a checkpoint with the model's spec ({opened.spec.num_layers} "
                                  f"layers, hidden {opened.spec.hidden_size}, "
                                  f"{opened.spec.num_experts} experts)",
                         found=f"{ckpt.spec.num_layers} layers, hidden {ckpt.spec.hidden_size}, "
                               f"{ckpt.spec.num_experts} experts")


def _batches(opened: _Opened, ckpt: Checkpoint, prompts, max_tokens, max_sequences, batch_size,
             long):
    from mixbuild.validate.data import evaluation_batches, long_batches

    tokenizer = opened.tokenizer_dir / TOKENIZER_FILE
    if not tokenizer.is_file():
        tokenizer = ckpt.path / TOKENIZER_FILE
    if long is None:
        return evaluation_batches(tokenizer, prompts, max_tokens=max_tokens, batch_size=batch_size,
                                  bos_id=ckpt.spec.bos_token_id, max_sequences=max_sequences)
    context = ckpt.spec.max_position_embeddings
    if long > context:
        raise UsageError(f"--long {long} is longer than the model's context",
                         expected=f"at most {context} tokens (max_position_embeddings)",
                         found=str(long), hint=f"pass --long {context} or less")
    return long_batches(tokenizer, prompts, long, bos_id=ckpt.spec.bos_token_id,
                        sequences=max_sequences or 1)


def _open(path: Path, backend: Backend, device: Device, dtype: str | None,
          accuracy_level: int = 1) -> _Opened:
    model_dir = ModelDir.resolve(path)
    chosen = model_dir.choose(backend, device, accuracy_level, verb="validate")
    if dtype is not None and chosen is not Backend.TORCH:
        raise UsageError(f"--dtype has no effect with the {chosen.value} backend",
                         expected="--dtype only with --backend torch",
                         found=f"--dtype {dtype}",
                         hint=f"drop --dtype: the {chosen.value} backend runs the dtype the "
                              "model was exported or built with")
    return _OPENERS[model_dir.kind](model_dir, device, dtype, accuracy_level)


# Each opener takes (ModelDir, device, dtype, accuracy_level), checked by ModelDir.choose and
# _open; what an opener does not use has been refused there when it could not apply.

def _open_ort(model_dir: ModelDir, device: Device, dtype: str | None, accuracy_level: int) -> _Opened:
    import numpy as np
    from onnx import helper

    from mixbuild.exporter.artifact import Artifact
    from mixbuild.exporter.weights import ArtifactWeights
    from mixbuild.runtime.ort_runner import OrtRunner
    from mixbuild.validate.diagnostics import expose
    from mixbuild.validate.passes import ServingModel

    providers = ["CPUExecutionProvider"]
    if device is Device.CUDA:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise MissingDependencyError("onnxruntime-gpu", "gpu",
                                         "validating on the ort backend with --device cuda")
        providers = ["CUDAExecutionProvider", *providers]
    artifact = Artifact.open(model_dir.path)
    spec = artifact.spec
    serving = artifact.layout is Layout.SERVING
    act = helper.np_dtype_to_tensor_dtype(np.dtype(artifact.dtype.numpy))
    found = {}

    def diagnostics(model) -> None:   # the session's private copy of the graph
        found["exposed"] = expose(model, spec.num_layers, act, serving,
                                  artifact.all_logits)

    runner = OrtRunner(artifact, providers=providers, graph_rewrite=diagnostics,
                       accuracy_level=accuracy_level)
    exposed = found["exposed"]
    model = ServingModel(runner, exposed, spec) if serving else _RenamedRunner(runner, exposed)
    return _Opened(runner, spec, artifact.precision, runner.kv_dtype,
                   artifact.path, True, ArtifactWeights(artifact).experts, model)


class _RenamedRunner:
    """A concat-layout OrtRunner whose exposed diagnostic values come out under their
    `debug.{i}.*` names."""

    def __init__(self, runner, exposed) -> None:
        self.runner, self.exposed = runner, exposed
        self.name, self.spec = runner.name, runner.spec

    def infer(self, feeds):
        return self.exposed.rename(self.runner.infer(feeds))


def _open_torch(model_dir: ModelDir, device: Device, dtype: str | None, accuracy_level: int) -> _Opened:
    import numpy as np

    from mixbuild.runtime.torch_runner import TorchRunner
    from mixbuild.validate.experts import torch_expert_weights

    compute = DType.parse(dtype or "fp32")
    runner = TorchRunner.from_checkpoint(model_dir.path, dtype=compute.torch, debug=True,
                                         device=device.value)
    # float32 feeds: the runner casts the past KV to its dtype (numpy has no bfloat16)
    return _Opened(runner, runner.spec, Precision.of_dtype(compute), np.float32, model_dir.path, True,
                   torch_expert_weights(runner))


def _open_hf_quantized(model_dir: ModelDir, device: Device, dtype: str | None,
                       accuracy_level: int) -> _Opened:
    """A quantized Hugging Face checkpoint written by `mixbuild export --format hf`: the torch
    backend with the dequantization the engines apply (mixbuild/runtime/hf_quantized.py),
    float32 on the CPU; the tolerances are those of its precision."""
    import numpy as np

    from mixbuild.runtime.hf_quantized import load_runner, read_manifest
    from mixbuild.validate.experts import torch_expert_weights

    if dtype is not None:   # the device was checked by ModelDir.choose
        raise UsageError("a quantized Hugging Face checkpoint is validated in float32 on the CPU",
                         found=f"--dtype {dtype}", hint="drop --dtype")
    runner = load_runner(model_dir.path, debug=True)   # every file's sha256 checked first
    precision = read_manifest(model_dir.path, verify=False).precision
    return _Opened(runner, runner.spec, precision, np.float32, model_dir.path, True,
                   torch_expert_weights(runner))


def _open_trt(model_dir: ModelDir, device: Device, dtype: str | None, accuracy_level: int) -> _Opened:
    from mixbuild.runtime.trt_runner import TrtRunner

    path = model_dir.path
    if model_dir.layout() is Layout.SERVING:
        raise UsageError(f"{path} is a serving-layout engine; validate compares the concat "
                         "layout's per-position outputs on the trt backend",
                         expected="an engine built from a `--layout concat` artifact",
                         found="layout 'serving' in engine.json",
                         hint="validate the artifact the engine was built from (the ort backend "
                              "runs the same graph), or build an engine from a --layout concat "
                              "export and validate that")
    runner = TrtRunner(path)   # checks the manifest and the TensorRT import first
    return _Opened(runner, runner.spec, runner.manifest.precision, runner.kv_dtype, path, False)


_OPENERS = {ModelKind.ARTIFACT: _open_ort, ModelKind.CHECKPOINT: _open_torch,
            ModelKind.HF_QUANTIZED: _open_hf_quantized, ModelKind.ENGINE: _open_trt}
