"""`mixbuild demo`: the whole main job on the built-in trained fixture model, no download."""

from __future__ import annotations

from pathlib import Path

from mixbuild.contract import REPORT_PLOT_FILE

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny-code"


def run_demo(out: str | Path) -> int:
    from rich.console import Console

    from mixbuild.exporter.export import export_checkpoint
    from mixbuild.inspect import inspect_checkpoint, render_checkpoint
    from mixbuild.validate.report import print_summary
    from mixbuild.validate.run import validate_artifact

    console = Console()
    out = Path(out)
    console.rule("1. inspect the built-in checkpoint (tiny-code)")
    render_checkpoint(inspect_checkpoint(FIXTURE))
    console.rule("2. export to ONNX (fp32, MoE custom ops, debug outputs)")
    artifact = export_checkpoint(FIXTURE, out / "tiny-code-fp32", debug_outputs=True, overwrite=True)
    console.print(f"artifact: {artifact}")
    console.rule("3. validate the artifact against transformers")
    report, report_dir = validate_artifact(artifact, FIXTURE, out / "validation", overwrite=True)
    print_summary(report)
    console.print(f"report: {report_dir / 'report.md'}, plot: {report_dir / REPORT_PLOT_FILE}")
    _generate_sample(console, artifact)
    return 0 if report.passed else 1


def _generate_sample(console, artifact: Path) -> None:
    """Greedy text from the artifact through the generation runtime (ONNX Runtime backend)."""
    import mixbuild.runtime as rt
    from mixbuild.runtime.cli import summary

    console.rule("4. generate with mixbuild.runtime (ONNX Runtime)")
    prompt = "class Parser:\n    def __init__(self"
    model = rt.load(artifact)
    result = model.generate(prompt, max_new_tokens=40)[0]
    console.print(prompt + result.text, markup=False, highlight=False)
    console.print(summary(result, model.backend), markup=False, highlight=False)
