"""`mixbuild validate`: an artifact against transformers on the checkpoint it came from."""

from __future__ import annotations

from pathlib import Path

from mixbuild.errors import UsageError
from mixbuild.exporter.artifact import Artifact
from mixbuild.model.checkpoint import Checkpoint


def validate_artifact(artifact_dir: str | Path, reference: str | Path, out: str | Path | None = None,
                      prompts: str | Path | None = None, max_tokens: int = 128, steps: int = 16,
                      max_sequences: int | None = 8, batch_size: int = 4,
                      overrides: dict[str, float] | None = None, plot: bool = True,
                      progress: bool = True, overwrite: bool = False):
    """Validate; returns (report, report_dir or None). A report directory that would be refused
    (mixbuild.atomic.check_destination) is refused before any work is done."""
    from mixbuild.atomic import check_destination
    from mixbuild.exporter.weights import ArtifactWeights
    from mixbuild.runtime.ort_runner import OrtRunner
    from mixbuild.validate.compare import validate
    from mixbuild.validate.data import evaluation_batches
    from mixbuild.validate.experts import ExpertWeightPair, checkpoint_expert_weights
    from mixbuild.validate.hf_runner import HFRunner
    from mixbuild.validate.report import write_report
    from mixbuild.validate.tolerances import load_tolerances

    inputs = [p for p in (artifact_dir, reference, prompts) if p is not None]
    if out is not None:
        check_destination(out, overwrite, "report", inputs)
    artifact = Artifact.open(artifact_dir)
    ckpt = Checkpoint(reference)
    if ckpt.spec.replace(dtype=artifact.spec.dtype) != artifact.spec:
        raise UsageError("the artifact was not exported from this checkpoint",
                         expected=f"a checkpoint with the artifact's spec ({artifact.spec.num_layers} "
                                  f"layers, hidden {artifact.spec.hidden_size}, "
                                  f"{artifact.spec.num_experts} experts)",
                         found=f"{ckpt.spec.num_layers} layers, hidden {ckpt.spec.hidden_size}, "
                               f"{ckpt.spec.num_experts} experts")
    tokenizer = artifact.path / "tokenizer.json"
    if not tokenizer.is_file():
        tokenizer = ckpt.path / "tokenizer.json"
    debug = bool(artifact.manifest.get("debug_outputs"))
    batches = evaluation_batches(tokenizer, prompts, max_tokens=max_tokens, batch_size=batch_size,
                                 bos_id=ckpt.spec.bos_token_id, max_sequences=max_sequences)
    hf = HFRunner(ckpt.path, router_logits=debug, hidden_states=debug, moe_inputs=debug)
    runner = OrtRunner(artifact)
    experts = None
    if debug:
        experts = ExpertWeightPair(checkpoint_expert_weights(ckpt.path),
                                   ArtifactWeights(artifact).experts)
    report = validate(hf, runner, artifact.spec, batches, steps,
                      load_tolerances(artifact.precision, overrides), experts,
                      artifact_kv_dtype=runner.kv_dtype, progress=progress)
    report_dir = (write_report(report, out, plot=plot, overwrite=overwrite, inputs=inputs)
                  if out is not None else None)
    return report, report_dir


