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
from mixbuild.serve.cli import accuracy_level_option, serve  # light: click only; the server loads on use

INTERNAL_ERROR = 70   # EX_SOFTWARE: a bug in mixbuild (1 is validate's "a check failed")


def _fail(exc: MixbuildError) -> None:
    click.echo(f"error: {exc.render()}", err=True)
    cause = exc.__cause__
    if cause is not None:
        first = (str(cause).strip().splitlines() or [""])[0]
        click.echo(f"  cause:    {type(cause).__name__}: {first[:300]}\n"
                   "  (`mixbuild --debug ...` shows the whole cause chain)", err=True)
    sys.exit(exc.exit_code)


def handles_errors(fn):
    """MixbuildError -> one message and its exit code (2); under --debug the traceback with its
    full cause chain. Ctrl-C and SIGTERM exit 130 / 143 after the outputs' cleanup ran."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mixbuild.atomic import Terminated

        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except MixbuildError as exc:
            if ctx.find_root().params.get("debug"):
                raise
            _fail(exc)
        except (KeyboardInterrupt, Terminated) as exc:
            click.echo("interrupted; no output was left half-written", err=True)
            sys.exit(getattr(exc, "exit_code", 130))
        except OSError as exc:   # disk full, permissions, a path that vanished: the environment's
            if ctx.find_root().params.get("debug"):
                raise
            _fail(MixbuildError(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
                                hint="free disk space, fix the permissions or the path, and retry"))
        except Exception as exc:
            if ctx.find_root().params.get("debug"):
                raise
            click.echo(f"internal error: mixbuild crashed ({type(exc).__name__}: {exc}).\n"
                       "This is a bug in mixbuild, not in your input. Run the same command as "
                       "`mixbuild --debug ...` and report the traceback it prints.", err=True)
            sys.exit(INTERNAL_ERROR)

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
    """Describe a checkpoint, artifact or engine directory and check its files.

    A checkpoint: spec, parameter counts, sizes, and every tensor's name, shape and values.
    An artifact (has mixbuild.json): verifies every file's sha256, prints the ONNX contract,
    op counts and sizes. An engine (engine.plan + engine.json): verifies the plan, prints the
    profiles, I/O and layers with the MoE plugin layers marked. A quantized checkpoint
    (`export --format hf | hf-modelopt`): verifies every file's sha256, prints its format,
    precision and files.
    """

    from mixbuild import inspect as insp
    from mixbuild.runtime.opener import ModelDir, ModelKind

    kind = ModelDir.classify(path)   # None: a checkpoint's own errors (missing config.json, ...)
    if kind is ModelKind.ENGINE:
        from mixbuild.builder.inspect import inspect_engine, render_engine

        report, render = inspect_engine(path), render_engine
    elif kind is ModelKind.ARTIFACT:
        report = insp.inspect_artifact(path)
        render = insp.render_artifact
    elif kind is ModelKind.HF_QUANTIZED:
        report, render = insp.inspect_hf_quantized(path), insp.render_hf_quantized
    elif config_only:
        report, render = insp.inspect_config(path), insp.render_checkpoint
    else:
        report = insp.inspect_checkpoint(path, read_values=not no_values, progress=not as_json)
        render = insp.render_checkpoint
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        render(report)


# export options that only some precisions read: parameter name -> those precisions
_PRECISION_OPTIONS = {"calib": ("fp8", "int4"), "calib_tokens": ("fp8", "int4"),
                      "int4_method": ("int4",), "group_size": ("int4",),
                      "fp8_weight_scales": ("fp8",), "lm_head": ("int4",)}


def _refuse_unused_options(ctx: click.Context, precision: str) -> None:
    """A UsageError for an option the user set (on the command line or through the
    environment) that the chosen --precision ignores: a silently ignored --group-size would
    leave the user believing it was applied."""
    from click.core import ParameterSource

    from mixbuild.errors import UsageError

    for name, applies in _PRECISION_OPTIONS.items():
        if ctx.get_parameter_source(name) not in (ParameterSource.COMMANDLINE,
                                                  ParameterSource.ENVIRONMENT):
            continue
        if precision in applies:
            continue
        flag = "--" + name.replace("_", "-")
        raise UsageError(f"{flag} has no effect with --precision {precision}",
                         expected=f"{flag} only with --precision {' or '.join(applies)}",
                         found=f"{flag} {ctx.params[name]} with --precision {precision}",
                         hint=f"drop {flag}, or export with --precision {applies[-1]}")


@main.command()
@click.argument("checkpoint", type=click.Path(file_okay=False, path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Artifact directory to create.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
              show_default=True, help="Activation type of the graph (and weight type unless quantized).")
@click.option("--precision", type=click.Choice(["float", "fp8", "int4"]), default="float",
              show_default=True, help="float: weights in --dtype; fp8: W8A8 E4M3; int4: W4A16 grouped.")
@click.option("--calib", type=click.Path(dir_okay=False, path_type=str),
              help="Calibration text file (UTF-8) for fp8/int4; default: a built-in text.")
@click.option("--calib-tokens", type=int, default=4096, show_default=True,
              help="Calibration tokens (in sequences of 256).")
@click.option("--int4-method", type=click.Choice(["awq", "rtn"]), default="awq", show_default=True,
              help="awq: activation-aware scale search; rtn: no scale search (the weights are still "
                   "GPTQ-rounded, as the manifest records).")
@click.option("--group-size", type=int, default=128, show_default=True, help="int4 group size along K.")
@click.option("--lm-head", type=click.Choice(["float", "int8", "int4"]), default="float",
              show_default=True,
              help="int4: lm_head's weights. float keeps them in --dtype; int8 / int4 quantize "
                   "them too (groups of --group-size, GPTQ on the final norm's output): on a CPU "
                   "the fp32 lm_head is most of a decode step's weight bytes for small models. "
                   "int8 runs with int8 activations on ONNX Runtime. docs/precision.md; validate "
                   "the result.")
@click.option("--fp8-weight-scales", type=click.Choice(["channel", "tensor"]), default="channel",
              show_default=True, help="fp8 weight scale granularity.")
@click.option("--debug-outputs", is_flag=True,
              help="Also output per-layer router logits, chosen experts and hidden states "
                   "(for `mixbuild validate`).")
@click.option("--layout", type=click.Choice(["serving", "concat"]), default=None,
              help="KV-cache contract: serving (the default; one fixed-capacity cache per layer "
                   "updated in place, per-row lengths, last-token logits; what `mixbuild serve` "
                   "and continuous batching need) or concat (past in, present out; the names "
                   "Optimum and onnxruntime-genai read, with genai_config.json and config.json "
                   "written for them). docs/contract.md.")
@click.option("--all-logits", is_flag=True,
              help="Serving layout: return the logits of every position, not only the last.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "hf", "hf-modelopt"]), default="onnx",
              show_default=True,
              help="onnx: the ONNX artifact; hf: a quantized Hugging Face checkpoint in the "
                   "compressed-tensors format (fp8 | int4; vLLM, SGLang, transformers); "
                   "hf-modelopt: NVIDIA's unified HF format (fp8 with --fp8-weight-scales tensor; "
                   "TensorRT-LLM, vLLM). --dtype sets the float tensors' type (docs/precision.md).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@handles_errors
def export(checkpoint: str, out: str, dtype: str, precision: str, calib: str | None,
           calib_tokens: int, int4_method: str, group_size: int, lm_head: str,
           fp8_weight_scales: str, debug_outputs: bool, layout: str, all_logits: bool, fmt: str,
           overwrite: bool) -> None:
    """Export a Hugging Face Mixtral checkpoint to an ONNX artifact with MoE custom ops (or,
    with --format hf | hf-modelopt, to a quantized Hugging Face checkpoint)."""
    import time

    from mixbuild.exporter.export import export_checkpoint
    from mixbuild.progress import human_bytes

    _refuse_unused_options(click.get_current_context(), precision)
    if fmt != "onnx":
        from mixbuild.contract import ExportFormat
        from mixbuild.exporter.hf import check_hf_options

        if precision == "float":
            check_hf_options(ExportFormat.parse(fmt), None)   # refuses: nothing to quantize
    if dtype == "bf16" and fmt == "onnx":
        click.echo("warning: ONNX Runtime's CPU provider cannot run a bf16 artifact (so neither "
                   "can `mixbuild run --device cpu` nor `mixbuild validate`): it needs a GPU "
                   "provider (--device cuda) or a TensorRT engine (`mixbuild engine`); export "
                   "--dtype fp32 or fp16 for ONNX Runtime on the CPU", err=True)
    quant = None
    if precision != "float":
        from mixbuild.quant.config import QuantConfig

        quant = QuantConfig.parse(precision, int4_method=int4_method, group_size=group_size,
                                  fp8_per_channel=fp8_weight_scales == "channel",
                                  calib_file=calib, calib_tokens=calib_tokens,
                                  lm_head=lm_head)
    start = time.perf_counter()
    path = export_checkpoint(checkpoint, out, dtype=dtype, debug_outputs=debug_outputs,
                             overwrite=overwrite, quant=quant, layout=layout, all_logits=all_logits,
                             format=fmt)
    size = sum(p.stat().st_size for p in path.iterdir())
    click.echo(f"exported {path} ({precision if quant else dtype}, {human_bytes(size)}) in "
               f"{time.perf_counter() - start:.1f} s")


@main.command()
@click.argument("artifacts", nargs=-1, required=True,
                type=click.Path(file_okay=False, path_type=str))
@click.option("--reference", required=True, type=click.Path(file_okay=False, path_type=str),
              help="The Hugging Face checkpoint the artifact was exported from (the oracle).")
@click.option("-o", "--output", "out", type=click.Path(path_type=str),
              help="Report directory (report.json, report.md, report.png). Default: "
                   "ARTIFACT/validation; with several artifacts ./validation (one report per "
                   "artifact plus one comparison table and plot).")
@click.option("--prompts", type=click.Path(dir_okay=False, path_type=str),
              help="Evaluation text: plain text (blank-line separated) or JSONL with 'text'/'prompt'.")
@click.option("--max-tokens", type=int, default=128, show_default=True,
              help="Tokens per evaluation sequence.")
@click.option("--max-sequences", type=int, default=8, show_default=True)
@click.option("--steps", type=int, default=16, show_default=True, help="Greedy tokens to generate.")
@click.option("--long", "long", type=int, metavar="N",
              help="Evaluate on sequences of N tokens (up to the model's context; the text "
                   "repeats as needed), --max-sequences of them, compared --chunk tokens at a "
                   "time through the KV cache so memory stays bounded.")
@click.option("--chunk", type=int, metavar="TOKENS",
              help="Tokens per teacher-forced call (default: a whole sequence; 256 with --long).")
@click.option("--tolerance", "tolerances", multiple=True, metavar="NAME=VALUE",
              help="Override a tolerance, e.g. --tolerance top1_agreement=0.95 (repeatable).")
@click.option("--no-plot", is_flag=True, help="Skip report.png.")
@click.option("--backend", type=click.Choice(["auto", "ort", "torch", "trt"]), default="auto",
              show_default=True, help="What runs ARTIFACT: ort (an artifact), torch (a checkpoint: "
                                      "mixbuild's reference model), trt (an engine); auto picks "
                                      "from the directory.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: the torch backend's MoE runs the Triton kernels; ort uses its CUDA "
                   "provider; trt needs it.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]),
              help="torch backend only: the dtype the checkpoint runs in, and so the tolerances "
                   "that apply. Default fp32.")
@click.option("--overwrite", is_flag=True,
              help="Replace the -o directory if it holds an earlier mixbuild validation report "
                   "(the default report directory is always replaced).")
@accuracy_level_option
@handles_errors
def validate(artifacts: tuple[str, ...], reference: str, out: str | None, prompts: str | None,
             max_tokens: int, max_sequences: int, steps: int, long: int | None,
             chunk: int | None, tolerances: tuple[str, ...], no_plot: bool, backend: str,
             device: str, dtype: str | None, overwrite: bool, accuracy_level: str) -> None:
    """Validate an artifact (or a checkpoint or engine, see --backend) against transformers on
    its checkpoint; several ARTIFACTS are compared on the same tokens in one table.

    Exit 0 when every check passes, 1 when any fails, 2 on a usage or input error.
    """
    from pathlib import Path

    from mixbuild.validate.report import print_comparison, print_summary
    from mixbuild.validate.run import validate_artifact, validate_artifacts
    from mixbuild.validate.tolerances import parse_override

    overrides = dict(parse_override(t) for t in tolerances)
    options = dict(prompts=prompts, max_tokens=max_tokens, steps=steps,
                   max_sequences=max_sequences, overrides=overrides, plot=not no_plot,
                   overwrite=overwrite or out is None, backend=backend, device=device,
                   dtype=dtype, long=long, chunk=chunk, accuracy_level=int(accuracy_level))
    if len(artifacts) == 1:
        report, report_dir = validate_artifact(
            artifacts[0], reference, out or Path(artifacts[0]) / "validation", **options)
        print_summary(report)
        passed = report.passed
    else:
        results, report_dir = validate_artifacts(artifacts, reference, out or "validation",
                                                 **options)
        print_comparison(results)
        passed = all(r.passed for _, r in results)
    click.echo(f"report: {report_dir}")
    sys.exit(0 if passed else 1)


@main.command()
@click.argument("artifact", type=click.Path(file_okay=False, path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Engine directory to create (engine.plan + engine.json).")
@click.option("--backend", type=click.Choice(["tensorrt-rtx", "tensorrt"]), default="tensorrt-rtx",
              show_default=True, help="tensorrt-rtx: ahead of time for --compute-capability, no GPU "
                                      "needed; tensorrt: for the local GPU.")
@click.option("--compute-capability", "--cc", "compute_capability", metavar="MAJOR.MINOR",
              help="Target GPU, e.g. 8.9 (TensorRT-RTX: 7.5 8.0 8.6 8.9 12.0 12.1). Default: the local GPU.")
@click.option("--moe", type=click.Choice(["plugin", "inline"]), default="plugin", show_default=True,
              help="plugin: MoE nodes become mixbuild's TensorRT plugins; inline: TensorRT imports "
                   "their ONNX function bodies.")
@click.option("--max-batch", type=int, default=1, show_default=True)
@click.option("--max-step-tokens", type=int, default=256, show_default=True,
              help="Most tokens one call feeds (a prompt or prompt chunk: the seq axis).")
@click.option("--max-context", type=int, default=1024, show_default=True,
              help="Most tokens per sequence, past + new.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="Builder optimisation level (0: fastest build).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=str),
              help="Timing cache file: loaded if present, saved after the build (TensorRT only).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@handles_errors
def engine(artifact, out, backend, compute_capability, moe, max_batch, max_step_tokens, max_context,
           opt_level, timing_cache, overwrite) -> None:
    """Compile an artifact to a TensorRT / TensorRT-RTX engine (engine.plan + engine.json)."""
    from mixbuild.builder.cli import engine_command

    engine_command(artifact, out, backend=backend, compute_capability=compute_capability, moe=moe,
                   max_batch=max_batch, max_step_tokens=max_step_tokens, max_context=max_context,
                   opt_level=opt_level, timing_cache=timing_cache, overwrite=overwrite, echo=click.echo)


def _logit_bias(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]):
    """--logit-bias TOKEN_ID=BIAS, repeatable -> ((id, bias), ...) (ranges: SamplingParams)."""
    pairs = []
    for value in values:
        token, sep, bias = value.partition("=")
        try:
            pairs.append((int(token), float(bias)))
        except ValueError:
            raise click.BadParameter(f"{value!r} is not TOKEN_ID=BIAS (e.g. 2=-100)") from None
        if not sep:
            raise click.BadParameter(f"{value!r} is not TOKEN_ID=BIAS (e.g. 2=-100)")
    return tuple(pairs)


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--prompt", required=True, help="The prompt text (a user message with --chat).")
@click.option("--backend", type=click.Choice(["auto", "ort", "torch", "trt"]), default="auto",
              show_default=True, help="auto picks from the directory: artifact -> ort, "
              "checkpoint -> torch, engine -> trt.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--stream", is_flag=True, help="Print text as tokens arrive.")
@click.option("--chat", is_flag=True, help="Render the prompt through the tokenizer's chat template.")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads (default: the backend's).")
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="Tokens to generate (default: generation_config.json, else 64).")
@click.option("--temperature", type=click.FloatRange(min=0), help="0 is greedy.")
@click.option("--top-k", type=click.IntRange(min=0), help="Keep the k most likely tokens (0: off).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Nucleus mass (1: off).")
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True))
@click.option("--seed", type=click.IntRange(min=0), help="Make sampling reproducible.")
@click.option("--stop", multiple=True, help="Stop string (repeatable); cut from the output.")
@click.option("--stop-token-id", "stop_token_ids", type=click.IntRange(min=0), multiple=True,
              help="Stop token id (repeatable).")
@click.option("--ignore-eos", is_flag=True, default=None, help="Keep going past end-of-sequence.")
@click.option("--presence-penalty", type=float,
              help="OpenAI's: subtracted once from each token already generated (-2..2).")
@click.option("--frequency-penalty", type=float,
              help="OpenAI's: subtracted per occurrence of each token already generated (-2..2).")
@click.option("--logit-bias", "logit_bias", multiple=True, callback=_logit_bias,
              metavar="TOKEN_ID=BIAS", help="Added to that token's logit, -100..100 (repeatable).")
@click.option("--min-tokens", type=click.IntRange(min=0),
              help="No end of sequence, stop token or stop string before this many tokens.")
@accuracy_level_option
@handles_errors
def run(model_dir: str, prompt: str, backend: str, device: str, stream: bool, chat: bool,
        threads: int | None, accuracy_level: str, **sampling) -> None:
    """Generate text from an artifact, checkpoint or engine directory; prints time to first
    token and tokens/s at the end. Sampling flags default to the model's generation_config.json."""
    from mixbuild.runtime.cli import cli_run

    cli_run(model_dir, prompt, backend=backend, device=device, stream=stream, chat=chat,
            threads=threads, accuracy_level=int(accuracy_level), echo=click.echo, **sampling)


@main.command()
@click.option("-o", "--output", "out", default="demo-out", show_default=True,
              type=click.Path(path_type=str), help="Where the demo writes its artifacts.")
@handles_errors
def demo(out: str) -> None:
    """The main job on the built-in trained model: inspect, export (fp32 + debug outputs),
    validate against transformers, and generate a little text."""
    from mixbuild.demo import run_demo

    sys.exit(run_demo(out))



serve.callback = handles_errors(serve.callback)
main.add_command(serve)


if __name__ == "__main__":  # pragma: no cover
    main()
