"""The OpenAI wire format: request parsing and validation, response and chunk shapes, errors.

Pure data in, data out (no HTTP, no model): `parse_completion` / `parse_chat` turn a decoded
JSON body into a `GenerationRequest` or raise `ApiError` (status, message, type, param, code:
OpenAI's error shape); the `*_response` / `*_chunk` functions build the JSON a client expects.

What is checked here: JSON types, the ranges OpenAI itself documents where mixbuild's own
limits are not the same (n, logprobs, top_logprobs), and the parameters mixbuild does not
implement but that would change the answer (tools, response_format, echo, best_of > 1, ...):
those are refused rather than silently ignored. Unknown fields are ignored, as OpenAI does.
The sampling values themselves are checked by the runtime (`SamplingParams.validate`), whose
messages the server passes on.
"""

from __future__ import annotations

import functools
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from mixbuild.jsonfile import json_type

MAX_N = 128             # OpenAI's own limit on n
MAX_LOGPROBS = 20       # top alternatives per token (OpenAI: 5 for completions, 20 for chat)


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def flat_message(error) -> str:
    """A MixbuildError's what / expected / found / fix on one line (JSON clients show one)."""
    parts = [f"{label}: {value}" for label, value in (("expected", error.expected),
                                                      ("found", error.found), ("fix", error.hint))
             if value is not None]
    return f"{error.what} ({'; '.join(parts)})" if parts else error.what


# --------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class GenerationRequest:
    """One /v1/completions or /v1/chat/completions call, checked.

    `prompts` holds the prompts (text or token ids; chat: one rendered later from `messages`);
    `sampling` the SamplingParams fields the client set (OpenAI names already mapped), and
    `logprobs` the number of alternatives per token (None: no log-probabilities)."""

    kind: str                                   # "completion" | "chat"
    model: str | None
    prompts: tuple[str | tuple[int, ...], ...] = ()
    messages: tuple[dict[str, str], ...] = ()
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    max_tokens_param: str = "max_tokens"        # the name the client used, for error messages


# What each endpoint takes that would change the result, with the value that changes nothing.
_COMPLETION_UNSUPPORTED = {"echo": (False,), "suffix": ("",), "best_of": (1,)}
_CHAT_UNSUPPORTED = {"tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"),
                     "function_call": ("none", "auto"), "response_format": ({"type": "text"},),
                     "audio": (), "modalities": (["text"],), "prediction": (),
                     "web_search_options": ()}


def parse_completion(body: Any) -> GenerationRequest:
    body = _object(body)
    _refuse_unsupported(body, _COMPLETION_UNSUPPORTED)
    if "prompt" not in body:
        raise _missing("prompt", "a string, a list of token ids, or a list of either")
    prompts = _prompts(body["prompt"])
    logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
    sampling = _sampling(body, "max_tokens")
    return GenerationRequest("completion", _model(body), prompts=prompts, n=_n(body),
                             stream=_stream(body), include_usage=_include_usage(body),
                             logprobs=logprobs, sampling=sampling)


def parse_chat(body: Any) -> GenerationRequest:
    body = _object(body)
    _refuse_unsupported(body, _CHAT_UNSUPPORTED)
    if "messages" not in body:
        raise _missing("messages", "a non-empty list of {role, content} objects")
    messages = _messages(body["messages"])
    wants = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not wants:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs",
                       code="invalid_value")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    sampling = _sampling(body, name)
    return GenerationRequest("chat", _model(body), messages=messages, n=_n(body),
                             stream=_stream(body), include_usage=_include_usage(body),
                             logprobs=(top or 0) if wants else None, sampling=sampling,
                             max_tokens_param=name)


def check_unicode(value: Any, where: str = "") -> None:
    """Refuse (400) a body holding text that is not valid Unicode: JSON may spell a lone
    surrogate (\\ud800), which no tokenizer, template or UTF-8 writer can take."""
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as error:
                name = path.encode("utf-8", "backslashreplace").decode() or "the body"
                raise ApiError(400, f"'{name}' holds text that is not valid Unicode: a lone "
                                    f"surrogate {item[error.start]!r} at character {error.start} "
                                    "(send UTF-8 text; surrogates only in valid pairs)",
                               param=name.split(".")[0].split("[")[0] if path else None,
                               code="invalid_value") from None
        elif isinstance(item, dict):
            for key, child in item.items():
                stack.append((key, path))
                stack.append((child, f"{path}.{key}" if path else str(key)))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not a JSON {json_type(body)}",
                       code="invalid_type")
    return body


def _missing(name: str, expected: str) -> ApiError:
    return ApiError(400, f"missing required parameter '{name}' ({expected})", param=name,
                    code="missing_required_parameter")


def _wrong_type(name: str, expected: str, value: Any) -> ApiError:
    return ApiError(400, f"invalid type for '{name}': expected {expected}, found a JSON "
                         f"{json_type(value)} ({_short(value)})", param=name, code="invalid_type")


def _out_of_range(name: str, expected: str, value: Any) -> ApiError:
    return ApiError(400, f"invalid value for '{name}': expected {expected}, found {_short(value)}",
                    param=name, code="invalid_value")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse_unsupported(body: dict[str, Any], table: dict[str, tuple]) -> None:
    for name, harmless in table.items():
        value = body.get(name)
        if value is None or any(value == h and type(value) is type(h) for h in harmless):
            continue
        raise ApiError(400, f"'{name}' is not supported by this server (mixbuild serve), and "
                            f"ignoring it would change the answer; found {_short(value)}",
                       param=name, code="unsupported_parameter")


def _model(body: dict[str, Any]) -> str | None:
    value = body.get("model")
    if value is not None and not isinstance(value, str):
        raise _wrong_type("model", "a string", value)
    return value


def _int(body: dict[str, Any], name: str, minimum: int | None = None,
         maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(name, "an integer", value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f"an integer in [{minimum}, {maximum}]" if maximum is not None
                  else f"an integer >= {minimum}")
        raise _out_of_range(name, bounds, value)
    return value


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(name, "a number", value)
    return float(value)


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _wrong_type(name, "a boolean", value)
    return value


def _n(body: dict[str, Any]) -> int:
    return _int(body, "n", 1, MAX_N) or 1


def _stream(body: dict[str, Any]) -> bool:
    return _bool(body, "stream", False)


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _wrong_type("stream_options", "an object", options)
    return _bool(options, "include_usage", False)


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _prompts(value: Any) -> tuple[str | tuple[int, ...], ...]:
    """OpenAI's four prompt forms: a string, a list of token ids, a list of strings, a list of
    lists of token ids."""
    expected = "a string, a list of token ids, or a non-empty list of strings / token-id lists"
    if isinstance(value, str):
        return (value,)
    if _token_ids(value):
        return (tuple(value),)
    if isinstance(value, list) and value:
        out: list[str | tuple[int, ...]] = []
        for item in value:
            if isinstance(item, str):
                out.append(item)
            elif _token_ids(item):
                out.append(tuple(item))
            else:
                raise _wrong_type("prompt", expected, value)
        return tuple(out)
    raise _wrong_type("prompt", expected, value)


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    """Chat messages as {role, content} with content a string; OpenAI's content parts are
    accepted when they are text (joined by newlines)."""
    if not isinstance(value, list) or not value:
        raise _wrong_type("messages", "a non-empty list of {role, content} objects", value)
    out = []
    for i, message in enumerate(value):
        name = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _wrong_type(name, "an object with 'role' and 'content'", message)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise _wrong_type(f"{name}.role", "a non-empty string", role)
        out.append({"role": role, "content": _content(message.get("content"), f"{name}.content")})
    return tuple(out)


def _content(value: Any, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _wrong_type(name, "a string or a list of content parts", value)
    texts = []
    for part in value:
        if not isinstance(part, dict):
            raise _wrong_type(name, "a list of content parts ({type: 'text', text})", value)
        if part.get("type") != "text":
            raise ApiError(400, f"content parts of type {_short(part.get('type'))} are not "
                                f"supported: this model reads text only", param=name,
                           code="unsupported_parameter")
        if not isinstance(part.get("text"), str):
            raise _wrong_type(f"{name}.text", "a string", part.get("text"))
        texts.append(part["text"])
    return "\n".join(texts)


def _sampling(body: dict[str, Any], max_tokens_name: str) -> dict[str, Any]:
    """The SamplingParams fields the client set, type-checked (ranges: the runtime's checks)."""
    out: dict[str, Any] = {}
    max_tokens = _int(body, max_tokens_name)
    if max_tokens is not None:
        out["max_new_tokens"] = max_tokens
    for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        value = _number(body, name)
        if value is not None:
            out[name] = value
    bias = body.get("logit_bias")
    if bias is not None:
        out["logit_bias"] = _logit_bias(bias)
    for name in ("seed", "top_k", "min_tokens"):
        value = _int(body, name)
        if value is not None:
            out[name] = value
    if body.get("ignore_eos") is not None:
        out["ignore_eos"] = _bool(body, "ignore_eos", False)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _wrong_type("stop", "a string or a list of strings", body["stop"])
        out["stop"] = tuple(stop)
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                              for t in ids)):
            raise _wrong_type("stop_token_ids", "a list of integers", ids)
        out["stop_token_ids"] = tuple(ids)
    return out


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: an object from token ids (JSON keys, so strings of digits) to a
    bias; the range [-100, 100] and the vocabulary are the runtime's checks."""
    if not isinstance(value, dict):
        raise _wrong_type("logit_bias", "an object mapping token ids to biases", value)
    pairs = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise _out_of_range("logit_bias", "token ids (strings of digits) as keys", key)
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise _wrong_type("logit_bias", "numbers as biases", bias)
        pairs.append((int(key), float(bias)))
    return tuple(sorted(pairs))


# SamplingParams field -> the OpenAI parameter a client sets (for runtime error messages)
_PARAM_NAMES = {"max_new_tokens": "max_tokens"}


_SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
                    "stop_token_ids", "stop", "ignore_eos", "presence_penalty", "frequency_penalty",
                    "logit_bias", "min_tokens")


def sampling_param(message: str, request: GenerationRequest) -> str | None:
    """Which request parameter a runtime sampling error is about: the field its message quotes,
    else the first field it mentions."""
    quoted = re.search(r"'(\w+)'", message)
    mentioned = [f for f in _SAMPLING_FIELDS if re.search(rf"\b{f}\b", message)]
    name = quoted.group(1) if quoted else mentioned[0] if mentioned else None
    if name is None:
        return None
    if name == "max_new_tokens":
        return request.max_tokens_param
    return _PARAM_NAMES.get(name, name)


# -------------------------------------------------------------------------------- responses
def request_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, created: int, model: str, choices: list[dict],
             used: dict[str, int] | None = None) -> dict[str, Any]:
    """A response or stream chunk: `kind` is OpenAI's `object` ("text_completion",
    "chat.completion", "chat.completion.chunk")."""
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": choices,
            "usage": used}


completion_response = completion_chunk = functools.partial(envelope, "text_completion")
chat_response = functools.partial(envelope, "chat.completion")
chat_chunk = functools.partial(envelope, "chat.completion.chunk")


def completion_choice(index: int, text: str, logprobs: dict | None,
                      finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, logprobs: dict | None,
                finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": logprobs, "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict[str, str], logprobs: dict | None,
               finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def model_card(name: str, created: int, context: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "mixbuild",
            "max_model_len": context}


# ------------------------------------------------------------------------------- log-probs
@dataclass(frozen=True)
class LogprobEntry:
    """One generated token's log-probability, its top alternatives, and where its text starts
    in the completion (completions' text_offset)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    offset: int


def completion_logprobs(entries: list[LogprobEntry], tokens: TokenText,
                        text_length: int | None = None) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, top_logprobs as {token: logprob} dicts."""
    clip = (lambda o: min(o, text_length)) if text_length is not None else (lambda o: o)
    return {"tokens": [tokens.text(e.token_id) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{tokens.text(t): lp for t, lp in e.top} for e in entries],
            "text_offset": [clip(e.offset) for e in entries]}


def chat_logprobs(entries: list[LogprobEntry], tokens: TokenText) -> dict[str, Any]:
    """The chat shape: one object per token with its bytes and a list of alternatives."""
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": tokens.text(token_id), "logprob": logprob,
                "bytes": list(tokens.bytes(token_id))}

    return {"content": [{**one(e.token_id, e.logprob),
                         "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries],
            "refusal": None}


class TokenText:
    """A token id's own bytes and text, as OpenAI shows them in log-probabilities.

    Decoding a single id loses what matters here: a byte-level BPE token can hold half of a
    UTF-8 character, and a SentencePiece decoder strips the leading space of a lone token. So
    the bytes come from the vocabulary entry (GPT-2's byte-to-unicode table for byte-level
    vocabularies, `<0xNN>` byte-fallback tokens, `▁` for a space), and a token whose bytes are
    not valid UTF-8 is written `bytes:\\xNN...` (OpenAI's notation)."""

    def __init__(self, tokenizer) -> None:
        import json

        self.backend = tokenizer.backend
        decoder = json.loads(self.backend.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or ()}
        self.byte_level = "ByteLevel" in kinds
        self.table = _byte_level_table() if self.byte_level else {}
        self.cache: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        if token_id not in self.cache:
            self.cache[token_id] = self._bytes(token_id)
        return self.cache[token_id]

    def _bytes(self, token_id: int) -> bytes:
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        if self.byte_level and all(c in self.table for c in piece):
            return bytes(self.table[c] for c in piece)
        return piece.replace("\u2581", " ").encode("utf-8")

    def text(self, token_id: int) -> str:
        raw = self.bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _byte_level_table() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}
