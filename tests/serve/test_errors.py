"""Every bad request gets OpenAI's error shape with a status and a message that says what was
wrong, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.conftest import API_KEY, NAME

PROMPT = {"model": NAME, "prompt": "def f(x):", "max_tokens": 2}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def post(http, path: str, **body) -> httpx.Response:
    return http.post(path, json=body)


def test_malformed_json(http):
    error = error_of(http.post("/v1/completions", content=b'{"prompt": "x",'), 400)
    assert error["code"] == "invalid_json" and "not valid JSON" in error["message"]
    error = error_of(http.post("/v1/completions", content=b"\xff\xfe"), 400)
    assert "not valid JSON" in error["message"]
    error = error_of(http.post("/v1/chat/completions", json=[1, 2]), 400)
    assert "must be a JSON object, not a JSON array" in error["message"]


@pytest.mark.parametrize("field, value, expected", [
    ("max_tokens", "10", "invalid type for 'max_tokens': expected an integer, found a JSON string"),
    ("max_tokens", 2.5, "invalid type for 'max_tokens': expected an integer"),
    ("temperature", "hot", "invalid type for 'temperature': expected a number"),
    ("stream", "yes", "invalid type for 'stream': expected a boolean"),
    ("prompt", 5, "invalid type for 'prompt'"),
    ("prompt", [], "invalid type for 'prompt'"),
    ("prompt", [1, "a"], "invalid type for 'prompt'"),
    ("stop", 5, "invalid type for 'stop': expected a string or a list of strings"),
    ("seed", True, "invalid type for 'seed': expected an integer, found a JSON boolean"),
    ("stream_options", "usage", "invalid type for 'stream_options'"),
    ("model", 3, "invalid type for 'model'"),
])
def test_wrong_types(http, field, value, expected):
    error = error_of(post(http, "/v1/completions", **{**PROMPT, field: value}), 400)
    assert expected in error["message"] and error["param"] == field
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_type"


def test_missing_fields(http):
    error = error_of(post(http, "/v1/completions", model=NAME), 400)
    assert error["param"] == "prompt" and error["code"] == "missing_required_parameter"
    error = error_of(post(http, "/v1/chat/completions", model=NAME), 400)
    assert error["param"] == "messages" and "missing required parameter" in error["message"]


@pytest.mark.parametrize("messages, param, expected", [
    ("hi", "messages", "invalid type for 'messages'"),
    ([], "messages", "invalid type for 'messages'"),
    (["hi"], "messages[0]", "invalid type for 'messages[0]'"),
    ([{"content": "hi"}], "messages[0].role", "invalid type for 'messages[0].role'"),
    ([{"role": "user", "content": 3}], "messages[0].content", "a string or a list of content parts"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content", "content parts of type 'image_url' are not supported"),
])
def test_bad_messages(http, messages, param, expected):
    error = error_of(post(http, "/v1/chat/completions", **{**CHAT, "messages": messages}), 400)
    assert expected in error["message"] and error["param"] == param


def test_unknown_model(http):
    error = error_of(post(http, "/v1/completions", **{**PROMPT, "model": "gpt-9"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'gpt-9' does not exist" in error["message"] and f"serves '{NAME}'" in error["message"]
    assert error_of(http.get("/v1/models/gpt-9"), 404)["code"] == "model_not_found"
    error = error_of(post(http, "/v1/chat/completions", **{**CHAT, "model": "gpt-9"}), 404)
    assert error["code"] == "model_not_found"


def test_prompt_longer_than_the_context(http):
    long = "x = 1\n" * 600                          # > 1024 tokens, the server's context
    error = error_of(post(http, "/v1/completions", **{**PROMPT, "prompt": long}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "the prompt is too long" in error["message"] and "context is 1024 tokens" in error["message"]
    error = error_of(post(http, "/v1/completions", **{**PROMPT, "prompt": [5] * 1024}), 400)
    assert "1024 tokens" in error["message"] and "at most 1023" in error["message"]
    chat = {**CHAT, "messages": [{"role": "user", "content": long}]}
    error = error_of(post(http, "/v1/chat/completions", **chat), 400)
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
    error = error_of(post(http, "/v1/completions", **{**PROMPT, "prompt": ["ok", long]}), 400)
    assert "prompt 1 is too long" in error["message"]


@pytest.mark.parametrize("field, value, param, expected", [
    # the runtime's own SamplingParams messages
    ("temperature", -1, "temperature", "invalid sampling value for 'temperature' (expected: a number >= 0"),
    ("top_p", 0, "top_p", "invalid sampling value for 'top_p' (expected: a number in (0, 1]"),
    ("max_tokens", 0, "max_tokens", "invalid sampling value for 'max_new_tokens' (expected: an integer >= 1"),
    ("seed", -3, "seed", "invalid sampling value for 'seed' (expected: an integer >= 0; found: -3)"),
    ("top_k", -1, "top_k", "invalid sampling value for 'top_k'"),
    ("repetition_penalty", 0, "repetition_penalty", "invalid sampling value for 'repetition_penalty'"),
    ("stop", [""], "stop", "invalid sampling value for 'stop' (expected: non-empty strings"),
    ("stop_token_ids", [99999], "stop_token_ids", "stop token id 99999 is outside the vocabulary"),
    # the server's own limits
    ("n", 0, "n", "invalid value for 'n': expected an integer in [1, 128], found 0"),
    ("n", 129, "n", "invalid value for 'n': expected an integer in [1, 128], found 129"),
    ("logprobs", 21, "logprobs", "invalid value for 'logprobs': expected an integer in [0, 20]"),
    ("prompt", [1, 2, 5000], "prompt", "holds token id 5000 at position 2, outside the vocabulary"),
])
def test_values_out_of_range(http, field, value, param, expected):
    error = error_of(post(http, "/v1/completions", **{**PROMPT, field: value}), 400)
    assert expected in error["message"] and error["param"] == param
    assert error["code"] == "invalid_value"


def test_chat_out_of_range(http):
    error = error_of(post(http, "/v1/chat/completions", **{**CHAT, "max_completion_tokens": 0}), 400)
    assert error["param"] == "max_completion_tokens" and "'max_new_tokens'" in error["message"]
    error = error_of(post(http, "/v1/chat/completions", **{**CHAT, "top_logprobs": 2}), 400)
    assert error["param"] == "top_logprobs" and "needs logprobs: true" in error["message"]
    error = error_of(post(http, "/v1/chat/completions",
                          **{**CHAT, "logprobs": True, "top_logprobs": 50}), 400)
    assert "expected an integer in [0, 20]" in error["message"]


@pytest.mark.parametrize("path, field, value", [
    ("/v1/completions", "echo", True),
    ("/v1/completions", "best_of", 2),
    ("/v1/completions", "suffix", "return x"),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "tool_choice", "required"),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "wav"}),
])
def test_unsupported_parameters_are_refused(http, path, field, value):
    body = PROMPT if path == "/v1/completions" else CHAT
    error = error_of(post(http, path, **{**body, field: value}), 400)
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    assert f"'{field}' is not supported" in error["message"]
    assert "would change the answer" in error["message"]


@pytest.mark.parametrize("path, field, value, message", [
    ("/v1/completions", "presence_penalty", 2.5, "a number in [-2, 2]"),
    ("/v1/chat/completions", "frequency_penalty", "high", "expected a number"),
    ("/v1/completions", "logit_bias", {"5": 101}, "biases in [-100, 100]"),
    ("/v1/completions", "logit_bias", {"five": 1}, "token ids (strings of digits) as keys"),
    ("/v1/completions", "logit_bias", [5, 1], "an object mapping token ids to biases"),
    ("/v1/chat/completions", "logit_bias", {"99999999": 1}, "outside the vocabulary"),
    ("/v1/completions", "min_tokens", 99, "at most max_new_tokens"),
])
def test_bad_openai_sampling_values_name_the_parameter(http, path, field, value, message):
    body = PROMPT if path == "/v1/completions" else CHAT
    error = error_of(post(http, path, **{**body, "max_tokens": 8, field: value}), 400)
    assert error["param"] == field and message in error["message"], error


def test_harmless_and_unknown_fields_are_ignored(http):
    body = {**PROMPT, "echo": False, "best_of": 1, "suffix": "", "presence_penalty": 0,
            "user": "someone", "metadata": {"a": "b"}, "some_future_field": [1, 2]}
    assert post(http, "/v1/completions", **body).status_code == 200
    chat = {**CHAT, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
            "store": False, "reasoning_effort": "low", "temperature": 0, "top_p": 0.5}
    assert post(http, "/v1/chat/completions", **chat).status_code == 200


@pytest.mark.parametrize("body, param", [
    (b'{"prompt": "def f(x):\\ud800", "max_tokens": 2}', "prompt"),
    (b'{"model": "\\udfff", "prompt": "x", "max_tokens": 2}', "model"),
    (b'{"prompt": "x", "stop": ["\\ud800"], "max_tokens": 2}', "stop"),
])
def test_a_lone_surrogate_is_a_400(http, body, param):
    """JSON can spell a lone surrogate; no tokenizer or UTF-8 writer takes one (was a 500)."""
    error = error_of(http.post("/v1/completions", content=body), 400)
    assert error["param"] == param and "not valid Unicode" in error["message"], error
    chat = b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'
    error = error_of(http.post("/v1/chat/completions", content=chat), 400)
    assert error["param"] == "messages" and "'messages[0].content'" in error["message"]


def test_choices_that_can_never_be_admitted_are_a_400(http):
    """n x prompts beyond --max-batch + --max-queue can never run: not a retryable 429."""
    error = error_of(post(http, "/v1/completions", **{**PROMPT, "prompt": ["a", "b", "c"],
                                                      "n": 128}), 400)
    assert error["param"] == "n" and "384 choices" in error["message"], error


def test_a_huge_prompt_is_refused_before_tokenizing_and_stalls_no_one(http, server):
    """A 15 MB prompt (under the 16 MiB body limit) is refused by its size; meanwhile /health
    keeps answering (the parse and the checks run off the event loop or in bounded time)."""
    import threading
    import time

    answer = {}

    def send() -> None:
        answer["response"] = post(http, "/v1/completions", **{**PROMPT, "prompt": "x" * 15_000_000})
    sender = threading.Thread(target=send)
    sender.start()
    slowest = 0.0
    with httpx.Client(base_url=server.url, timeout=30) as other:
        while sender.is_alive():
            start = time.perf_counter()
            assert other.get("/health").status_code == 200
            slowest = max(slowest, time.perf_counter() - start)
            time.sleep(0.02)
    sender.join()
    error = error_of(answer["response"], 400)
    assert error["code"] == "context_length_exceeded" and "bytes of text" in error["message"]
    assert slowest < 1.0, f"/health took {slowest:.2f} s while the big prompt was handled"


def test_a_client_that_leaves_during_the_upload_is_no_error(server):
    """A body cut short is a disconnect: counted as one, no traceback, no 500."""
    import socket
    import time
    from urllib.parse import urlparse

    url = urlparse(server.url)
    before = server.metrics().get("mixbuild_http_disconnects_total", 0)
    with socket.create_connection((url.hostname, url.port)) as raw:
        raw.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}"
                    "\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                    '{"prompt": "'.encode())
        time.sleep(0.2)
    deadline = time.time() + 10
    while server.metrics().get("mixbuild_http_disconnects_total", 0) == before:
        assert time.time() < deadline, "the disconnect was never counted"
        time.sleep(0.05)
    assert "Traceback" not in server.output()
    assert not any(k.startswith("mixbuild_http_requests_total") and 'status="500"' in k
                   for k in server.metrics())


def test_a_huge_body_is_refused(http):
    error = error_of(http.post("/v1/completions", content=b" " * (17 * 2**20)), 413)
    assert error["code"] == "request_too_large" and "larger than 16777216 bytes" in error["message"]


def test_routes_and_methods(http):
    error = error_of(http.post("/v1/embeddings", json={}), 404)
    assert error["code"] == "not_found" and "no route POST /v1/embeddings" in error["message"]
    error = error_of(http.get("/v1/completions"), 405)
    assert "GET is not allowed on /v1/completions" in error["message"]


def test_the_server_is_still_up(http, server):
    assert http.get("/health").status_code == 200
    assert post(http, "/v1/completions", **PROMPT).status_code == 200
    assert server.proc.poll() is None
    assert "Traceback" not in server.output()
