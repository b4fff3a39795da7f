"""The mixbuild command line: a thin layer over the library.

Every command turns MixbuildError into one clear message and exit code 2; --debug shows the
traceback instead.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from mixbuild import __version__
from mixbuild.errors import MixbuildError


def _fail(exc: MixbuildError) -> None:
    click.echo(f"error: {exc.render()}", err=True)
    sys.exit(exc.exit_code)


def handles_errors(fn):
    """Print MixbuildError as one message (or re-raise under --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except MixbuildError as exc:
            if ctx.find_root().params.get("debug"):
                raise
            _fail(exc)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mixbuild")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def main(debug: bool) -> None:
    """Export, quantize, compile, run and validate Mixtral-family MoE models."""


@main.command()
@click.argument("path", type=click.Path(file_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--no-values", is_flag=True, help="Check names and shapes only; skip reading every tensor.")
@click.option("--config-only", is_flag=True,
              help="Describe config.json alone (no weights needed): spec, parameter counts, sizes.")
@handles_errors
def inspect(path: str, as_json: bool, no_values: bool, config_only: bool) -> None:
    """Describe a checkpoint or artifact directory and check its files.

    A checkpoint: spec, parameter counts, sizes, and every tensor's name, shape and values.
    An artifact (has mixbuild.json): verifies every file's sha256, prints the ONNX contract,
    op counts and sizes.
    """
    from pathlib import Path

    from mixbuild import inspect as insp
    from mixbuild.exporter.contract import MANIFEST_FILE

    if (Path(path) / MANIFEST_FILE).is_file():
        report = insp.inspect_artifact(path)
        render = insp.render_artifact
    elif config_only:
        report, render = insp.inspect_config(path), insp.render_checkpoint
    else:
        report = insp.inspect_checkpoint(path, read_values=not no_values, progress=not as_json)
        render = insp.render_checkpoint
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        render(report)


@main.command()
@click.argument("checkpoint", type=click.Path(file_okay=False, path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Artifact directory to create.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
              show_default=True, help="Weight and activation type of the graph.")
@click.option("--debug-outputs", is_flag=True,
              help="Also output per-layer router logits, chosen experts and hidden states "
                   "(for `mixbuild validate`).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@handles_errors
def export(checkpoint: str, out: str, dtype: str, debug_outputs: bool, overwrite: bool) -> None:
    """Export a Hugging Face Mixtral checkpoint to an ONNX artifact with MoE custom ops."""
    import time

    from mixbuild.exporter.export import export_checkpoint
    from mixbuild.inspect import human_bytes

    start = time.perf_counter()
    path = export_checkpoint(checkpoint, out, dtype=dtype, debug_outputs=debug_outputs,
                             overwrite=overwrite)
    size = sum(p.stat().st_size for p in path.iterdir())
    click.echo(f"exported {path} ({dtype}, {human_bytes(size)}) in "
               f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":  # pragma: no cover
    main()
