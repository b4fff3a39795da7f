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
    """Describe a checkpoint directory and check its weights."""
    from mixbuild.inspect import inspect_checkpoint, inspect_config, render_checkpoint

    if config_only:
        report = inspect_config(path)
    else:
        report = inspect_checkpoint(path, read_values=not no_values, progress=not as_json)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        render_checkpoint(report)


if __name__ == "__main__":  # pragma: no cover
    main()
