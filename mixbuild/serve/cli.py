"""`mixbuild serve MODEL_DIR`: load a model, bind, and run the OpenAI-compatible app on uvicorn.

Importing this module is light (click only): the CLI registers the command at import time,
and starlette, uvicorn and the runtime load when the command runs.
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import click

from mixbuild.contract import ACCURACY_LEVEL_HELP, ACCURACY_LEVELS, Layout

DEFAULT_DRAIN_TIMEOUT = 30.0
DRAIN_GRACE = 5.0                # seconds after the drain timeout for the cut answers' last bytes
DEFAULT_CONNECTIONS = 1024       # --limit-concurrency: well above --max-batch + --max-queue

# `--accuracy-level`, as `mixbuild run`, `serve` and `validate` take it
accuracy_level_option = click.option(
    "--accuracy-level", type=click.Choice([str(k) for k in ACCURACY_LEVELS]), default="1",
    show_default=True, help=ACCURACY_LEVEL_HELP)


@click.command()
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; set --api-key then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port; 0 picks a free one (printed at start).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="KV-cache slots: requests decoded together in one batch.")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Cache positions per slot, prompt + completion [default: the model's context, "
                   "at most 4096].")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
              help="Requests that may wait for a slot; past that the server answers 429.")
@click.option("--step-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Tokens one scheduler iteration feeds at most (decodes first, then chunks "
                   "of prompts).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads of ONNX Runtime / torch [default: all cores].")
@click.option("--backend", type=click.Choice(["auto", "ort", "torch", "trt"]), default="auto",
              show_default=True,
              help="ort: a serving-layout artifact; torch: a checkpoint (serving layout); trt: "
                   "an engine built from a serving-layout artifact (CUDA; unverified).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where the model runs [default: cpu; cuda for trt].")
@click.option("--api-key", envvar="MIXBUILD_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* [env: MIXBUILD_API_KEY].")
@click.option("--model-name", default=None,
              help="The model id clients pass [default: the directory's name].")
@click.option("--no-batching", is_flag=True,
              help="One thread per request through the per-call runtime (the baseline that "
                   "continuous batching is measured against); no logprobs.")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=DEFAULT_DRAIN_TIMEOUT,
              show_default=True,
              help="Seconds Ctrl-C / SIGTERM waits for running requests before cancelling them.")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="Log one line per HTTP request.")
@click.option("--limit-concurrency", type=click.IntRange(min=1), default=DEFAULT_CONNECTIONS,
              show_default=True,
              help="uvicorn answers 503 to a request that arrives with this many connections "
                   "(its own included) or requests in progress.")
@click.option("--timeout-keep-alive", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds an idle keep-alive connection stays open.")
@accuracy_level_option
def serve(model_dir: str, host: str, port: int, max_batch: int, max_context: int | None,
          max_queue: int, step_tokens: int, threads: int | None, backend: str, device: str | None,
          api_key: str | None, model_name: str | None, no_batching: bool, drain_timeout: float,
          access_log: bool, limit_concurrency: int, timeout_keep_alive: float,
          accuracy_level: str) -> None:
    """Serve a model over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions
    (SSE streaming with "stream": true), /v1/models, /health, /metrics (Prometheus).

    MODEL_DIR is a serving-layout artifact (`mixbuild export CKPT -o DIR --layout serving`) or
    a Hugging Face checkpoint (run by the torch backend). Requests share the KV-cache slots of
    one continuous-batching scheduler."""
    from mixbuild.errors import require

    require("starlette", "serve", "mixbuild serve")
    uvicorn = require("uvicorn", "serve", "mixbuild serve")
    from mixbuild.serve.app import create_app

    model = open_model(model_dir, backend=backend, no_batching=no_batching, max_batch=max_batch,
                       max_context=max_context, max_queue=max_queue, step_tokens=step_tokens,
                       threads=threads, device=device, accuracy_level=int(accuracy_level))
    name = model_name or Path(model_dir).resolve().name
    app = create_app(model, model_name=name, api_key=api_key, drain_timeout=drain_timeout)
    sock = _bind(host, port)
    _banner(model, name, model_dir, sock.getsockname()[1], host, api_key)
    # the app cuts what still runs at drain_timeout, each request with a final error; uvicorn
    # waits DRAIN_GRACE more for those answers to be written before it closes the connections
    config = uvicorn.Config(app, log_level="info", access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=drain_timeout + DRAIN_GRACE,
                            limit_concurrency=limit_concurrency,
                            timeout_keep_alive=timeout_keep_alive)
    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.begin_drain()
            super().handle_exit(sig, frame)

    with _exit_cleanly_on_signals():
        Draining(config).run(sockets=[sock])
    click.echo("mixbuild serve: stopped")


def open_model(model_dir: str, *, backend: str = "auto", no_batching: bool = False,
               max_batch: int = 8, max_context: int | None = None, max_queue: int = 256,
               step_tokens: int = 1024, threads: int | None = None, device: str | None = None,
               accuracy_level: int = 1):
    """The Model the server runs, opened through mixbuild.runtime.opener like every command:
    a serving-layout artifact (ort), a checkpoint or a quantized Hugging Face checkpoint
    (torch, in the serving layout) or an engine built from a serving-layout artifact (trt,
    CUDA) behind the continuous-batching scheduler. A concat-layout artifact or engine has no
    in-place cache to batch into: it is served through the per-call runtime (one request per
    thread, as with no_batching), and the banner says so."""
    from mixbuild.contract import Backend
    from mixbuild.runtime.api import load
    from mixbuild.runtime.opener import ModelDir

    model_dir_ = ModelDir.resolve(model_dir)
    chosen = model_dir_.backend if backend == "auto" else Backend(backend)   # load refuses a wrong one
    device = device or ("cuda" if chosen is Backend.TRT else "cpu")
    if model_dir_.layout() is Layout.CONCAT:
        no_batching = True
    return load(model_dir_.path, backend=chosen.value, device=device,
                layout="serving" if chosen is Backend.TORCH and not no_batching else None,
                max_batch=1 if no_batching else max_batch, max_context=max_context,
                threads=threads, step_tokens=step_tokens, max_queue=max_queue,
                continuous_batching=not no_batching, accuracy_level=accuracy_level)


def _bind(host: str, port: int):
    """The listening socket, bound here so that a taken port is a clear error and --port 0 can
    report the port it got."""
    import socket

    from mixbuild.errors import UsageError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {error.strerror or error}",
                         hint="pick another --port (0 picks a free one), or stop what uses it") from error
    return sock


def _banner(model, name: str, model_dir: str, port: int, host: str, api_key: str | None) -> None:
    layout = model.step.layout.value
    click.echo(f"mixbuild serve: model '{name}' from {model_dir} ({model.backend} backend, "
               f"{layout} layout, context {model.context_limit} tokens)")
    options = model.options
    if model.step.layout is Layout.CONCAT:
        click.echo("  warning: the concat KV-cache layout has no continuous batching: one thread "
                   f"per request, at most {options.max_queue} at once; re-export with the default "
                   "layout (`mixbuild export CKPT -o DIR`, --layout serving) to batch requests",
                   err=True)
    elif not model.continuous_batching:
        click.echo(f"  one thread per request (--no-batching), at most {options.max_queue} at once")
    else:
        click.echo(f"  continuous batching: {options.max_batch} slots, prefill chunks of "
                   f"{options.step_tokens} tokens, queue of {options.max_queue}")
    shown = f"[{host}]" if ":" in host else host
    auth = "API key required" if api_key else "no API key"
    click.echo(f"  OpenAI API at http://{shown}:{port}/v1 ({auth}); /health, /metrics")
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"  warning: listening on {host} without --api-key: anyone who reaches it can "
                   "use the model", err=True)
    click.echo("  Ctrl-C or SIGTERM: finish the running requests, then stop")


def _ignore(signum, frame) -> None:
    pass


@contextlib.contextmanager
def _exit_cleanly_on_signals():
    """uvicorn handles Ctrl-C / SIGTERM itself (graceful shutdown: the running requests finish,
    then the app's lifespan closes the model) and afterwards re-raises the signal to the handler
    that was there before it. That handler is a no-op here, so a drained server exits 0 rather
    than being killed by the default SIGTERM handler; the previous handlers return after."""
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
