"""The OpenAI-compatible ASGI app over one loaded Model (Starlette).

    app = create_app(mixbuild.runtime.load("artifacts/tiny-serving"), api_key="secret")
    uvicorn.run(app)            # or mount it inside a service's own Starlette / FastAPI app

Every choice of a request is one request of the model: on a continuous-batching model one
`Model.submit_ids` (its events arrive on the scheduler's thread and are handed to the event
loop with `call_soon_threadsafe`, so the scheduler never waits for a client); on a model
without it (`--no-batching`, the thread-per-request baseline) one `Model.stream_ids` on a
thread of its own. The event loop only routes and writes: no model work runs on it, and JSON
parsing, tokenization and chat templating run on two worker threads.

A client that goes away cancels its choices (the scheduler frees their slots at its next
iteration): a stream notices when the server reports the disconnect, a plain request through
a watcher on the connection. Nothing a client sends can raise out of a handler: bad input is a
400 in OpenAI's error shape, a full queue a 429, a server shutting down a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mixbuild.errors import MixbuildError, UsageError
from mixbuild.runtime.metrics import ServingMetrics
from mixbuild.runtime.scheduler import Event, Overloaded
from mixbuild.runtime.tokenizer import IncrementalDetokenizer
from mixbuild.serve import protocol as p

log = logging.getLogger("mixbuild.serve")

MAX_BODY_BYTES = 16 * 2**20
COMPLETION_MAX_TOKENS = 16      # OpenAI's default for /v1/completions when max_tokens is absent
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def create_app(model, *, model_name: str | None = None, api_key: str | None = None,
               drain_timeout: float | None = 30.0, close_model: bool = True) -> Starlette:
    """The ASGI app serving `model` (a loaded `mixbuild.runtime.Model` with a tokenizer).

    model_name is what clients pass as `model` (default: the model's directory name when the
    caller sets it, else "mixbuild"). api_key, when set, is required as `Authorization: Bearer
    KEY` on /v1/*. The app's lifespan starts the scheduler and, on shutdown (after the server
    stopped taking connections and let the running ones finish), closes the model, finishing
    what still runs within drain_timeout seconds; close_model=False leaves the model to its
    owner (a service that mounts this app and manages the model itself)."""
    return _Server(model, model_name or "mixbuild", api_key, drain_timeout, close_model).app


class _Server:
    def __init__(self, model, name: str, api_key: str | None, drain_timeout: float | None,
                 close_model: bool) -> None:
        if model.tokenizer is None:
            raise UsageError("the OpenAI API needs the model's tokenizer, and this model "
                             "directory has no tokenizer.json",
                             hint="add the checkpoint's tokenizer.json to the model directory")
        self.model, self.name, self.api_key = model, name, api_key
        self.drain_timeout, self.close_model = drain_timeout, close_model
        self.engine = _Scheduled(model) if model.continuous_batching else _Threaded(model)
        self.tokens = p.TokenText(model.tokenizer)
        self.token_bytes = model.tokenizer.longest_token_bytes()
        self.workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mixbuild-tokenize")
        self.created = int(time.time())
        self.closing = False
        self.runs: set[_Run] = set()          # the requests generating now
        self.loop: asyncio.AbstractEventLoop | None = None
        self.http: Counter[tuple[str, int]] = Counter()
        self.disconnects = 0
        routes = [Route("/v1/completions", self._endpoint(self.completions), methods=["POST"]),
                  Route("/v1/chat/completions", self._endpoint(self.chat), methods=["POST"]),
                  Route("/v1/models", self._endpoint(self.models), methods=["GET"]),
                  Route("/v1/models/{name:path}", self._endpoint(self.model_info), methods=["GET"]),
                  Route("/health", self._endpoint(self.health), methods=["GET"]),
                  Route("/metrics", self._endpoint(self.metrics), methods=["GET"])]
        self.app = Starlette(routes=routes, lifespan=self._lifespan,
                             exception_handlers={HTTPException: self._http_error})
        self.app.state.begin_drain = self.begin_drain

    # ------------------------------------------------------------------------- plumbing
    @contextlib.asynccontextmanager
    async def _lifespan(self, app) -> AsyncIterator[None]:
        self.loop = asyncio.get_running_loop()
        self.engine.start()
        try:
            yield
        finally:
            self.closing = True
            self.workers.shutdown(wait=False)
            if self.close_model:
                await asyncio.to_thread(self.model.close, True, self.drain_timeout)

    def begin_drain(self) -> None:
        """Shutdown has begun (the server calls this on Ctrl-C / SIGTERM, from any thread): new
        requests get 503, and the requests still generating when drain_timeout runs out are
        cut, each with a final error (a stream: an error event, then [DONE]; a plain request:
        a 503), instead of a connection closed mid-answer."""
        if self.loop is None or self.drain_timeout is None:
            return

        def start() -> None:
            if not self.closing:
                self.closing = True
                self.loop.call_later(self.drain_timeout, self._cut)
        self.loop.call_soon_threadsafe(start)

    def _cut(self) -> None:
        for run in list(self.runs):
            run.queue.put_nowait((CUT, Event()))

    def _endpoint(self, handler: Callable) -> Callable:
        """`handler` with errors turned into OpenAI-shaped answers, and the answer counted."""
        async def endpoint(request: Request) -> Response:
            try:
                response = await handler(request)
            except ClientDisconnect:   # it left while sending its body: nobody reads an answer
                self.disconnects += 1
                response = Response(status_code=499)
            except p.ApiError as error:
                response = _error_response(error)
            except Overloaded as error:
                closing = self.closing or error.reason == Overloaded.SHUTTING_DOWN
                response = _error_response(p.ApiError(
                    503 if closing else 429, p.flat_message(error),
                    type="server_error" if closing else "rate_limit_error",
                    code="shutting_down" if closing else "queue_full"))
            except UsageError as error:
                response = _error_response(p.ApiError(400, p.flat_message(error),
                                                       code="invalid_value"))
            except MixbuildError as error:
                response = _error_response(p.ApiError(500, p.flat_message(error),
                                                      type="server_error"))
            except Exception as error:  # a bug must not take the worker down
                log.exception("internal error in %s", request.url.path)
                response = _error_response(p.ApiError(
                    500, f"internal error: {type(error).__name__}: {error} (a bug in mixbuild "
                         "serve; the server log has the traceback)", type="server_error"))
            self.http[(_route_path(request), response.status_code)] += 1
            return response

        return endpoint

    async def _http_error(self, request: Request, error: HTTPException) -> Response:
        self.http[("other", error.status_code)] += 1
        message = (f"no route {request.method} {request.url.path}" if error.status_code == 404
                   else f"{request.method} is not allowed on {request.url.path}"
                   if error.status_code == 405 else str(error.detail))
        return _error_response(p.ApiError(error.status_code, message,
                                          code="not_found" if error.status_code == 404 else None))

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode()):
            found = "no Authorization header" if "authorization" not in request.headers \
                else "a different key or scheme"
            raise p.ApiError(401, f"invalid or missing API key: this server needs the header "
                                  f"'Authorization: Bearer KEY' ({found})", code="invalid_api_key")

    async def _body(self, request: Request) -> Any:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                raise p.ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes",
                                 code="request_too_large")
        return await self._off_loop(_parse_body, bytes(data))

    async def _off_loop(self, fn: Callable, *args):
        """fn(*args) on the server's worker threads (tokenizing, templating and parsing a large
        request must not hold the event loop: every other client's stream waits on it)."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, fn, *args)

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise p.ApiError(404, f"the model '{name}' does not exist on this server, which "
                                  f"serves '{self.name}' (see GET /v1/models)",
                             param="model", code="model_not_found")

    # ------------------------------------------------------------------------ endpoints
    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        parsed = p.parse_completion(await self._body(request))
        self._check_model(parsed.model)
        self._check_fits(parsed, len(parsed.prompts))
        count = len(parsed.prompts)
        prompts = []
        for i, prompt in enumerate(parsed.prompts):
            if not isinstance(prompt, tuple):
                self._check_size(len(prompt.encode()), i, count)
            ids = list(prompt) if isinstance(prompt, tuple) \
                else await self._off_loop(self.model.tokenizer.encode, prompt)
            prompts.append(self._prompt_ids(ids, i, count))
        return await self._generate(request, parsed, prompts)

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        parsed = p.parse_chat(await self._body(request))
        self._check_model(parsed.model)
        self._check_fits(parsed, 1)
        self._check_size(sum(len(m["content"].encode()) for m in parsed.messages), 0, 1,
                         "messages")
        try:
            ids = await self._off_loop(self.model.tokenizer.encode_chat, list(parsed.messages))
        except MixbuildError:
            raise
        except Exception as error:  # jinja2's TemplateError, a template's raise
            raise p.ApiError(400, f"the model's chat template refused the messages: {error}",
                             param="messages", code="invalid_value") from None
        return await self._generate(request, parsed, [self._prompt_ids(ids, 0, 1, "messages")])

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model_info(self, request: Request) -> Response:
        self._authorize(request)
        self._check_model(request.path_params["name"])
        return JSONResponse(self._card())

    async def health(self, request: Request) -> Response:
        if self.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.name})

    async def metrics(self, request: Request) -> Response:
        lines = ["# HELP mixbuild_http_requests_total HTTP requests answered, by route and status.",
                 "# TYPE mixbuild_http_requests_total counter"]
        lines += [f'mixbuild_http_requests_total{{route="{route}",status="{status}"}} {count}'
                  for (route, status), count in sorted(self.http.items())]
        lines += ["# HELP mixbuild_http_disconnects_total Requests cancelled because their client "
                  "went away.", "# TYPE mixbuild_http_disconnects_total counter",
                  f"mixbuild_http_disconnects_total {self.disconnects}"]
        text = self.engine.metrics.prometheus() + "\n".join(lines) + "\n"
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def _card(self) -> dict[str, Any]:
        return p.model_card(self.name, self.created, self.model.context_limit)

    # ----------------------------------------------------------------------- generation
    def _check_fits(self, parsed: p.GenerationRequest, prompts: int) -> None:
        """A request of more choices than the server ever admits at once can never run: a 400
        (a 429 would tell the client to retry what cannot succeed)."""
        choices = prompts * parsed.n
        if choices > self.engine.most:
            raise p.ApiError(400, f"the request asks for {choices} choices ({prompts} prompt(s) "
                                  f"x n = {parsed.n}), and this server admits at most "
                                  f"{self.engine.most} at once (--max-batch + --max-queue): "
                                  "send fewer prompts or a smaller n per request",
                             param="n", code="invalid_value")

    def _check_size(self, nbytes: int, index: int, count: int, param: str = "prompt") -> None:
        """Refuse a prompt too long for the context before tokenizing it: no token of this
        tokenizer covers more than `token_bytes` UTF-8 bytes, so a text of more than
        token_bytes x context bytes is longer than the context whatever it says (x 4 more: a
        normalizer may shorten the text before it is split)."""
        limit = self.model.context_limit
        bound = 4 * self.token_bytes * limit
        if nbytes > bound:
            which = f"prompt {index}" if count > 1 else "the prompt"
            raise p.ApiError(400, f"{which} is too long: {nbytes} bytes of text is more than "
                                  f"{limit} tokens for this tokenizer (its longest token is "
                                  f"{self.token_bytes} bytes), and this server's context is "
                                  f"{limit} tokens (shorten it, or start the server with a "
                                  "larger --max-context)",
                             param=param, code="context_length_exceeded")

    def _prompt_ids(self, ids: list[int], index: int, count: int, param: str = "prompt") -> list[int]:
        """Token ids within the vocabulary and the context (checked here so that the message
        names the request's own parameter; the runtime checks again)."""
        vocab, limit = self.model.spec.vocab_size, self.model.context_limit
        which = f"prompt {index}" if count > 1 else "the prompt"
        bad = next(((i, t) for i, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise p.ApiError(400, f"{which} holds token id {bad[1]} at position {bad[0]}, outside "
                                  f"the vocabulary (expected ids in [0, {vocab}))",
                             param=param, code="invalid_value")
        if len(ids) >= limit:
            raise p.ApiError(400, f"{which} is too long: {len(ids)} tokens, and this server's "
                                  f"context is {limit} tokens (prompt and completion together), "
                                  f"so a prompt may have at most {limit - 1} (shorten it, or start "
                                  "the server with a larger --max-context)",
                             param=param, code="context_length_exceeded")
        return ids

    def _sampling(self, parsed: p.GenerationRequest):
        """The request's SamplingParams: the model's defaults (generation_config.json) under the
        values the client set. temperature 0 is greedy, as in OpenAI's API: valid top_k / top_p
        are then dropped instead of refused (invalid ones still get the runtime's message)."""
        overrides = dict(parsed.sampling)
        if parsed.kind == "completion":
            overrides.setdefault("max_new_tokens", COMPLETION_MAX_TOKENS)
        if overrides.get("temperature", self.model.defaults.sampling.temperature) == 0:
            if overrides.get("top_k", 0) >= 0:
                overrides["top_k"] = 0
            if 0 < overrides.get("top_p", 1.0) <= 1:
                overrides["top_p"] = 1.0
        try:
            params = self.model.sampling(**overrides)
            params.check_vocab(self.model.spec.vocab_size)
        except UsageError as error:
            message = p.flat_message(error)
            raise p.ApiError(400, message, code="invalid_value",
                             param=p.sampling_param(message, parsed)) from None
        return params

    async def _generate(self, request: Request, parsed: p.GenerationRequest,
                        prompts: list[list[int]]) -> Response:
        if self.closing:
            raise Overloaded("the server is shutting down and takes no new requests",
                             reason=Overloaded.SHUTTING_DOWN)
        if parsed.logprobs is not None and not self.engine.logprobs:
            raise p.ApiError(400, "logprobs need continuous batching, and this server runs one "
                                  "thread per request (--no-batching)", param="logprobs",
                             code="unsupported_parameter")
        params = self._sampling(parsed)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos
                                                 else set(self.model.defaults.eos_token_ids))
        run = _Run(asyncio.get_running_loop())
        self.runs.add(run)
        choices = []
        try:
            for prompt_index, ids in enumerate(prompts):
                for j in range(parsed.n):
                    seeded = params if params.seed is None or j == 0 \
                        else params.replace(seed=params.seed + j)
                    detok = IncrementalDetokenizer(self.model.tokenizer) \
                        if parsed.logprobs is not None else None
                    choices.append(_Choice(prompt_index, detok, stop_ids))
                    run.add(self.engine.submit(ids, seeded, parsed.logprobs,
                                               run.deliver_to(len(choices) - 1)))
        except BaseException:
            run.cancel()
            self.runs.discard(run)
            raise
        view = _View(parsed, self.name, self.tokens, [len(ids) for ids in prompts])
        if parsed.stream:
            return _EventStream(self._stream(run, choices, view), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request, run, choices, view)

    async def _collect(self, request: Request, run: _Run, choices: list[_Choice],
                       view: _View) -> Response:
        async def consume() -> None:
            async for index, event in run.events():
                if index == CUT:
                    run.cancel()
                    raise self._cut_error()
                choices[index].take(event)

        collector = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.runs.discard(run)
            if not collector.done():        # the client went away (or the handler was cancelled)
                run.cancel()
                collector.cancel()
                self.disconnects += watcher.done()
            watcher.cancel()
        if not collector.done() or collector.cancelled():
            return Response(status_code=499)    # nobody reads it
        collector.result()
        failed = next((c.error for c in choices if c.error is not None), None)
        if failed is not None:
            raise failed
        return JSONResponse(view.response(choices))

    def _cut_error(self) -> Overloaded:
        return Overloaded(f"the server shut down before this request finished: it was still "
                          f"generating when the {self.drain_timeout:g} s drain timeout ran out",
                          reason=Overloaded.SHUTTING_DOWN,
                          hint="retry against a running server")

    async def _stream(self, run: _Run, choices: list[_Choice], view: _View) -> AsyncIterator[str]:
        finished = False
        try:
            for chunk in view.opening(len(choices)):
                yield _sse(chunk)
            failed = None
            async for index, event in run.events():
                if index == CUT:
                    failed = self._cut_error()
                    break
                choice = choices[index]
                piece, entries = choice.take(event)
                if event.error is not None:
                    failed = event.error
                    break
                if event.result is not None:
                    yield _sse(view.chunk(index, piece, entries, _finish(event.result)))
                elif piece or entries:
                    yield _sse(view.chunk(index, piece, entries, None))
            if failed is not None:
                run.cancel()
                code = "shutting_down" if isinstance(failed, Overloaded) else None
                yield _sse(p.error_body(p.flat_message(failed), "server_error", code=code))
            elif view.request.include_usage:
                yield _sse(view.usage_chunk(choices))
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            self.runs.discard(run)
            if not finished:
                self.disconnects += 1
            run.cancel()


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed when the response ends, however it
    ends (a disconnect reported as a cancellation, or a failed send): closing it cancels the
    request's choices."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            await self.body_iterator.aclose()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (the request body was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _parse_body(data: bytes) -> Any:
    """The request body as JSON with only valid Unicode text, or the 400 (on a worker thread:
    both walk the whole body)."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise p.ApiError(400, f"the request body is not valid JSON: {error}",
                         code="invalid_json") from None
    p.check_unicode(body)
    return body


def _route_path(request: Request) -> str:
    path = request.url.path
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return "/v1/models" if path.startswith("/v1/models") else path if path in ROUTES else "other"


def _error_response(error: p.ApiError) -> Response:
    headers = {"Retry-After": "1"} if error.status in (429, 503) else None
    if error.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _finish(result) -> str:
    return result.finish_reason.value       # "stop" | "length" | "cancelled"


# ------------------------------------------------------------------------------ one request
CUT = -1     # the index of the event that cuts a run short at the end of the drain timeout


class _Run:
    """The choices of one HTTP request: their events, delivered from the scheduler's (or a
    worker's) thread into one asyncio queue, and their cancellation."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.jobs: list = []
        self.open = 0

    def add(self, job) -> None:
        self.jobs.append(job)
        self.open += 1

    def deliver_to(self, index: int) -> Callable[[Event], None]:
        def deliver(event: Event) -> None:   # on the scheduler's thread: never raise, never wait
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except Exception:  # the event loop is gone: nobody is listening
                self.cancel()

        return deliver

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        while self.open:
            index, event = await self.queue.get()
            if index != CUT and event.last:
                self.open -= 1
            yield index, event


class _Choice:
    """What one choice has produced so far."""

    def __init__(self, prompt_index: int, detok: IncrementalDetokenizer | None,
                 stop_ids: set[int]) -> None:
        self.prompt_index = prompt_index
        self.detok, self.stop_ids = detok, stop_ids
        self.decoded = 0                   # characters of text before the next token
        self.entries: list[p.LogprobEntry] = []
        self.result = None
        self.error: MixbuildError | None = None

    def take(self, event: Event) -> tuple[str, list[p.LogprobEntry]]:
        """Record `event`; the text it releases and its log-probability entries (none for the
        token that ends a request by its id: it has no text, as in OpenAI's answers)."""
        if event.error is not None:
            self.error = event.error
        if event.result is not None:
            self.result = event.result
        entries = []
        if event.logprob is not None and self.detok is not None \
                and event.token_id not in self.stop_ids:
            lp = event.logprob
            entries.append(p.LogprobEntry(lp.token_id, lp.logprob, lp.top, self.decoded))
            self.decoded += len(self.detok.push(lp.token_id))
            self.entries += entries
        return event.text, entries


class _View:
    """The response shapes of one request's endpoint (completions or chat)."""

    def __init__(self, request: p.GenerationRequest, model: str, tokens: p.TokenText,
                 prompt_lengths: list[int]) -> None:
        self.request, self.model, self.tokens = request, model, tokens
        self.chat = request.kind == "chat"
        self.id = p.request_id(request.kind)
        self.created = int(time.time())
        self.prompt_tokens = sum(prompt_lengths)

    def _logprobs(self, entries: list[p.LogprobEntry], text: str | None = None) -> dict | None:
        if self.request.logprobs is None:
            return None
        if self.chat:
            return p.chat_logprobs(entries, self.tokens)
        return p.completion_logprobs(entries, self.tokens, None if text is None else len(text))

    def usage(self, choices: list[_Choice]) -> dict[str, int]:
        generated = sum(len(c.result.token_ids) for c in choices if c.result is not None)
        return p.usage(self.prompt_tokens, generated)

    def response(self, choices: list[_Choice]) -> dict[str, Any]:
        make = p.chat_choice if self.chat else p.completion_choice
        out = [make(i, c.result.text or "", self._logprobs(c.entries, c.result.text or ""),
                    _finish(c.result)) for i, c in enumerate(choices)]
        build = p.chat_response if self.chat else p.completion_response
        return build(self.id, self.created, self.model, out, self.usage(choices))

    def opening(self, count: int) -> list[dict[str, Any]]:
        if not self.chat:
            return []
        return [p.chat_chunk(self.id, self.created, self.model,
                             [p.chat_delta(i, {"role": "assistant", "content": ""}, None, None)])
                for i in range(count)]

    def chunk(self, index: int, text: str, entries: list[p.LogprobEntry],
              finish: str | None) -> dict[str, Any]:
        logprobs = self._logprobs(entries) if entries else None
        if self.chat:
            delta = {"content": text} if text or finish is None else {}
            return p.chat_chunk(self.id, self.created, self.model,
                                [p.chat_delta(index, delta, logprobs, finish)])
        return p.completion_chunk(self.id, self.created, self.model,
                                  [p.completion_choice(index, text, logprobs, finish)])

    def usage_chunk(self, choices: list[_Choice]) -> dict[str, Any]:
        build = p.chat_chunk if self.chat else p.completion_chunk
        return build(self.id, self.created, self.model, [], self.usage(choices))


# ------------------------------------------------------------------------------- engines
class _Scheduled:
    """Choices as requests of the model's continuous-batching scheduler."""

    logprobs = True

    def __init__(self, model) -> None:
        self.model = model
        # the most choices admitted at once: every slot free and the queue empty
        self.most = model.options.max_batch + model.options.max_queue

    @property
    def metrics(self) -> ServingMetrics:
        return self.model.scheduler.metrics

    def start(self) -> None:
        _ = self.model.scheduler           # allocate the KV slots before the first request

    def submit(self, ids: list[int], params, logprobs: int | None, deliver):
        return self.model.submit_ids(ids, params, logprobs=logprobs, on_event=deliver)


class _ThreadJob:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class _Threaded:
    """Choices each generated by the per-call runtime on a thread of their own (its own batch
    of one and KV cache): the baseline continuous batching is measured against. At most
    max_queue run at once; past that, `Overloaded`."""

    logprobs = False

    def __init__(self, model) -> None:
        self.model = model
        self.limit = self.most = model.options.max_queue
        self.metrics = ServingMetrics(self.limit)

    def start(self) -> None:
        pass

    def submit(self, ids: list[int], params, logprobs: int | None, deliver) -> _ThreadJob:
        with self.metrics.lock:
            if self.metrics.running >= self.limit:
                self.metrics.refused += 1
                raise Overloaded("too many requests are running",
                                 expected=f"at most {self.limit} at once (--max-queue)",
                                 found=f"{self.metrics.running} running",
                                 hint="retry later, or start the server with a larger --max-queue")
            self.metrics.running += 1
        try:
            stream = self.model.stream_ids(ids, params)     # checks the request here
        except BaseException:
            with self.metrics.lock:
                self.metrics.running -= 1
            raise
        job = _ThreadJob()
        threading.Thread(target=self._work, args=(stream, job, deliver, len(ids)),
                         name="mixbuild-request", daemon=True).start()
        return job

    def _work(self, stream, job: _ThreadJob, deliver, prompt_tokens: int) -> None:
        result, outcome = None, "error"
        try:
            for piece in stream:
                if job.cancelled.is_set():
                    stream.close()
                    outcome = "cancelled"
                    return
                deliver(Event(text=piece))
            result = stream.result
            outcome = result.finish_reason.value
            deliver(Event(result=result))
        except MixbuildError as error:
            deliver(Event(error=error))
        except Exception as error:  # the worker reports, never dies silently
            log.exception("generation failed")
            deliver(Event(error=MixbuildError(f"generation failed: {type(error).__name__}: {error}")))
        finally:
            self._count(result, prompt_tokens, outcome)

    def _count(self, result, prompt_tokens: int, outcome: str) -> None:
        with self.metrics.lock:
            self.metrics.running -= 1
            self.metrics.finished[outcome] = self.metrics.finished.get(outcome, 0) + 1
            self.metrics.prompt_tokens += prompt_tokens
            if result is not None:
                self.metrics.generation_tokens += len(result.token_ids)
                if result.token_ids:
                    self.metrics.ttft.observe(result.timings.time_to_first_token_s)
