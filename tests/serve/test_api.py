"""The OpenAI API surface of `mixbuild serve`, through the official `openai` client and raw
HTTP: completions, chat, streaming, logprobs, stop, n, seeds, usage, models, metrics."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.serve.conftest import API_KEY, NAME

PROMPT = "def fibonacci(n):\n"
CHAT = [{"role": "user", "content": "Write a function that adds two numbers."}]


def complete(client, **kwargs):
    return client.completions.create(model=NAME, **{"prompt": PROMPT, "max_tokens": 12, **kwargs})


def sse(response: httpx.Response) -> list[dict | str]:
    """The data lines of a server-sent-event stream, decoded ([DONE] stays a string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return out


def test_completion(client, tokenizer):
    out = complete(client)
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == NAME and out.id.startswith("cmpl-")
    assert choice.index == 0 and choice.text and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_a_token_id_prompt_is_the_same_prompt(client, tokenizer):
    by_text = complete(client)
    by_ids = complete(client, prompt=tokenizer.encode(PROMPT))
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage == by_text.usage


def test_several_prompts_give_one_choice_each(client):
    other = "import os\n"
    both = complete(client, prompt=[PROMPT, other])
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == complete(client).choices[0].text
    assert both.choices[1].text == complete(client, prompt=other).choices[0].text


def test_streaming_gives_the_same_text(client):
    whole = complete(client, max_tokens=20)
    chunks = list(complete(client, max_tokens=20, stream=True,
                           stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_raw_stream_framing(http):
    with http.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4,
                                                       "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" and e["usage"] is None for e in events[:-1])


def test_chat(client, tokenizer):
    out = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=16)
    choice = out.choices[0]
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == len(tokenizer.encode_chat(CHAT))
    chunks = list(client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=16,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_max_completion_tokens_and_text_parts(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": CHAT[0]["content"]}]}]
    out = client.chat.completions.create(model=NAME, messages=parts, max_completion_tokens=3,
                                         extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    plain = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=3,
                                           extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == plain.choices[0].message.content


def test_completion_logprobs(client):
    out = complete(client, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and logprob <= 0
        assert top[token] == pytest.approx(logprob)            # greedy: the most likely one
        assert logprob == pytest.approx(max(top.values()))


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=8, logprobs=True,
                                         top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 8
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for entry in content:
        assert bytes(entry.bytes).decode() == entry.token
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    streamed = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=8,
                                              logprobs=True, top_logprobs=2, stream=True,
                                              extra_body={"ignore_eos": True})
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]


def test_stop_strings(client):
    text = complete(client, max_tokens=24).choices[0].text
    stop = text[6:9]
    cut = text[:text.index(stop)]
    out = complete(client, max_tokens=24, stop=[stop, "never-appears"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in complete(client, max_tokens=24, stop=stop,
                                                           stream=True))
    assert streamed == cut


def test_n_choices_use_consecutive_seeds(client):
    many = complete(client, n=3, temperature=1.0, seed=7)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.usage.completion_tokens == 36
    assert many.choices[0].text == complete(client, temperature=1.0, seed=7).choices[0].text
    assert many.choices[1].text == complete(client, temperature=1.0, seed=8).choices[0].text
    greedy = complete(client, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text
    streamed = list(complete(client, n=2, temperature=1.0, seed=7, stream=True))
    for i in range(2):
        text = "".join(c.choices[0].text for c in streamed if c.choices[0].index == i)
        assert text == many.choices[i].text


def test_seeds_are_deterministic(client):
    first = complete(client, temperature=1.0, top_p=0.95, seed=123, max_tokens=16)
    again = complete(client, temperature=1.0, top_p=0.95, seed=123, max_tokens=16)
    other = complete(client, temperature=1.0, top_p=0.95, seed=124, max_tokens=16)
    assert first.choices[0].text == again.choices[0].text
    assert other.choices[0].text != first.choices[0].text


def test_mixbuild_extras(client):
    base = complete(client, max_tokens=16).choices[0].text
    penalized = complete(client, max_tokens=16, extra_body={"repetition_penalty": 1.5})
    assert penalized.choices[0].text != base
    sampled = complete(client, max_tokens=16, temperature=0.7, seed=1, extra_body={"top_k": 1})
    assert sampled.choices[0].text == base          # top_k=1 sampling is greedy


def test_openai_sampling_parameters(client, tokenizer, fixture_dir):
    """logit_bias, presence / frequency penalties and min_tokens reach the token choice."""
    from mixbuild.runtime.sampling import GenerationDefaults

    token = tokenizer.encode(" return")[-1]
    forced = complete(client, max_tokens=6, logit_bias={str(token): 100})
    assert forced.choices[0].text == tokenizer.decode([token] * 6)
    base = complete(client, max_tokens=24).choices[0].text     # "... schemed on the scheme ..."
    assert complete(client, max_tokens=24, frequency_penalty=2.0).choices[0].text != base
    assert complete(client, max_tokens=24, presence_penalty=-2.0).choices[0].text != base
    eos = GenerationDefaults.read(fixture_dir, None).eos_token_ids[0]
    ended = complete(client, max_tokens=8, logit_bias={str(eos): 100})
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == 1
    held = complete(client, max_tokens=8, logit_bias={str(eos): 100}, extra_body={"min_tokens": 5})
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens == 6


def test_models(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    card = client.models.retrieve(NAME)
    assert card.id == NAME and card.owned_by == "mixbuild"
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"},
                     timeout=5).json()["data"][0]["max_model_len"] == 1024


def test_health_and_metrics_need_no_key(server, client):
    complete(client, max_tokens=2)
    assert httpx.get(f"{server.url}/health", timeout=5).json() == {"status": "ok", "model": NAME}
    response = httpx.get(f"{server.url}/metrics", timeout=5)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("mixbuild_requests_running", "mixbuild_queue_depth", "mixbuild_kv_slots_total 8",
                 "mixbuild_time_to_first_token_seconds_bucket", "mixbuild_step_seconds_count",
                 'mixbuild_http_requests_total{route="/v1/completions",status="200"}',
                 "# TYPE mixbuild_generation_tokens_total counter"):
        assert name in text, name
    assert server.metrics()["mixbuild_generation_tokens_total"] > 0


def test_the_api_key(server):
    url = f"{server.url}/v1/completions"
    body = {"prompt": PROMPT, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(url, json=body, headers=headers, timeout=5)
        assert response.status_code == 401, headers
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and "Authorization: Bearer KEY" in error["message"]
    assert httpx.get(f"{server.url}/v1/models", timeout=5).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
    assert ok.status_code == 200
