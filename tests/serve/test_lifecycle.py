"""Disconnects, a full queue, SIGTERM, the thread-per-request baseline, and what `mixbuild
serve` refuses to start on."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from click.testing import CliRunner

from mixbuild.cli import main
from tests.serve.conftest import API_KEY, NAME, ROOT

LONG = {"model": NAME, "prompt": "def f(x):", "max_tokens": 900, "ignore_eos": True}
CANCELLED = 'mixbuild_requests_finished_total{finish_reason="cancelled"}'


def wait_idle(server, cancelled: float, timeout: float = 3.0) -> dict[str, float]:
    """The metrics once no request runs and `cancelled` requests have been counted cancelled;
    fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        if metrics["mixbuild_requests_running"] == 0 and metrics.get(CANCELLED, 0) >= cancelled:
            return metrics
        assert time.monotonic() < deadline, f"still running after {timeout} s: {metrics}"
        time.sleep(0.02)


@pytest.fixture
def authorized(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=30) as http:
        yield http


def test_a_stream_that_disconnects_frees_its_slot(server, authorized):
    before = server.metrics()
    with authorized.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
        assert response.status_code == 200
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data: ")
            if received == 3:
                break                               # leaving the block closes the connection
    gone = time.monotonic()
    after = wait_idle(server, before.get(CANCELLED, 0) + 1)
    print(f"slot freed {time.monotonic() - gone:.3f} s after the client went away")
    generated = after["mixbuild_generation_tokens_total"] - before["mixbuild_generation_tokens_total"]
    assert generated < LONG["max_tokens"]
    assert after["mixbuild_http_disconnects_total"] == before["mixbuild_http_disconnects_total"] + 1


def test_a_plain_request_whose_client_leaves_is_cancelled(server):
    before = server.metrics()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=0.3,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    after = wait_idle(server, before.get(CANCELLED, 0) + 1)
    generated = after["mixbuild_generation_tokens_total"] - before["mixbuild_generation_tokens_total"]
    assert generated < LONG["max_tokens"]


def test_a_full_queue_answers_429(servers):
    small = servers["small"]                  # --max-batch 1 --max-queue 1
    count = 6
    answers: list[httpx.Response | None] = [None] * count
    start = threading.Barrier(count)

    def client(i: int) -> None:
        start.wait()
        answers[i] = httpx.post(f"{small.url}/v1/completions", timeout=60,
                                json={**LONG, "max_tokens": 300})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1
    assert set(statuses) == {200, 429}, statuses
    for answer in answers:
        if answer.status_code == 429:
            error = answer.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
            assert "the request queue is full" in error["message"]
            assert "at most 1 waiting requests" in error["message"]
            assert answer.headers["retry-after"] == "1"
        else:
            assert answer.json()["usage"]["completion_tokens"] == 300
    assert small.metrics()["mixbuild_requests_refused_total"] == statuses.count(429)


def stream_then_sigterm(server, body: dict) -> list[str]:
    """The SSE data lines of a streamed completion; SIGTERM goes to the server after two."""
    events = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                if len(events) == 2:
                    server.proc.send_signal(signal.SIGTERM)
    return events


def test_sigterm_finishes_the_running_stream_and_exits_0(servers):
    small = servers["small"]
    body = {**LONG, "max_tokens": 300, "stream": True, "stream_options": {"include_usage": True}}
    events = stream_then_sigterm(small, body)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 300
    assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"
    assert small.proc.wait(timeout=20) == 0, small.output()
    assert "mixbuild serve: stopped" in small.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{small.url}/health", timeout=2)


def test_no_batching_runs_a_thread_per_request(servers, server):
    threads, main_server = servers["threads"], server
    body = {"model": NAME, "prompt": "def fibonacci(n):\n", "max_tokens": 12}
    answers: list[dict | None] = [None] * 4

    def client(i: int) -> None:
        answers[i] = httpx.post(f"{threads.url}/v1/completions", json=body, timeout=30).json()

    workers = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    batched = httpx.post(f"{main_server.url}/v1/completions", json=body, timeout=30,
                         headers={"Authorization": f"Bearer {API_KEY}"}).json()
    texts = {a["choices"][0]["text"] for a in answers}
    assert texts == {batched["choices"][0]["text"]}
    assert all(a["usage"] == batched["usage"] for a in answers)
    with httpx.stream("POST", f"{threads.url}/v1/completions", json={**body, "stream": True},
                      timeout=30) as response:
        pieces = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(p["choices"][0]["text"] for p in pieces) == batched["choices"][0]["text"]
    refused = httpx.post(f"{threads.url}/v1/completions", json={**body, "logprobs": 1}, timeout=30)
    assert refused.status_code == 400
    assert "logprobs need continuous batching" in refused.json()["error"]["message"]
    metrics = threads.metrics()
    assert metrics["mixbuild_requests_running"] == 0
    assert metrics['mixbuild_requests_finished_total{finish_reason="length"}'] == 5


def test_a_concat_artifact_is_served_one_request_at_a_time(fixture_concat_artifact, capsys):
    """A concat export has no in-place cache to batch into: serve opens it through the
    per-call runtime (as --no-batching does) and its banner says how to get batching."""
    from mixbuild.serve.cli import _banner, open_model

    model = open_model(str(fixture_concat_artifact), max_batch=4, threads=1)
    try:
        assert model.backend == "ort" and not model.continuous_batching
        assert model.options.max_batch == 1
        _banner(model, "m", str(fixture_concat_artifact), 8000, "127.0.0.1", None)
        err = capsys.readouterr().err
        assert "concat KV-cache layout has no continuous batching" in err and "--layout serving" in err
        ids = model.tokenizer.encode("def f(x):")
        assert len(model.generate_ids([ids], max_new_tokens=3, ignore_eos=True)[0].token_ids) == 3
    finally:
        model.close()


@pytest.mark.parametrize("source", ["checkpoint", "fp8 --format hf"])
def test_a_checkpoint_runs_on_torch_in_the_serving_layout(fixture_dir, tmp_path, source):
    """A float checkpoint, and a `mixbuild export --format hf` one (float8 tensors the plain
    checkpoint reader refuses), open on the torch backend behind the scheduler."""
    from mixbuild.exporter.export import export_checkpoint
    from mixbuild.serve.cli import open_model
    from tests.conftest import small_quant

    path = fixture_dir if source == "checkpoint" else export_checkpoint(
        fixture_dir, tmp_path / "hf", quant=small_quant("fp8"), format="hf", progress=False)
    model = open_model(str(path), max_batch=2, max_context=64, threads=1)
    try:
        assert model.backend == "torch" and model.continuous_batching
        handle = model.submit_ids(model.tokenizer.encode("def f(x):"), max_new_tokens=3,
                                  ignore_eos=True)
        assert len(handle.result(timeout=60).token_ids) == 3
    finally:
        model.close()


def test_a_missing_extra_names_it(serving_artifact):
    code = ("import sys; sys.modules['uvicorn'] = None\n"
            "from mixbuild.cli import main\n"
            f"main(['serve', {str(serving_artifact)!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "needs the Python package 'uvicorn'" in proc.stderr
    assert "pip install 'mixbuild[serve]'" in proc.stderr


def test_an_engine_directory_goes_to_the_trt_backend(tmp_path, monkeypatch):
    """An engine directory is served by the trt backend on CUDA (TrtServingStep); here, with no
    TensorRT and no GPU, what stops it is the runtime's own clear refusal (exit 2)."""
    from mixbuild.model.presets import PRESETS
    from tests.helpers import write_engine_dir

    engine = write_engine_dir(tmp_path / "engine", PRESETS["tiny"], layout="serving")
    seen = {}

    def load(path, **options):
        seen.update(options)
        from mixbuild.errors import UsageError
        raise UsageError("the trt backend needs a CUDA GPU, and torch sees none")
    monkeypatch.setattr("mixbuild.runtime.api.load", load)
    result = CliRunner().invoke(main, ["serve", str(engine)])
    assert result.exit_code == 2 and "needs a CUDA GPU" in result.output, result.output
    assert seen["backend"] == "trt" and seen["device"] == "cuda"


def test_a_damaged_engine_manifest_is_refused_before_loading(tmp_path):
    """serve reads the engine's layout from its checked engine.json: an empty one is named."""
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "engine.plan").write_bytes(b"not a plan")
    (engine / "engine.json").write_text("{}")
    result = CliRunner().invoke(main, ["serve", str(engine)])
    assert result.exit_code == 2, result.output
    assert "not an engine manifest of a known format" in result.output


def test_connection_limit_and_keep_alive_timeout(serving_artifact, tmp_path):
    """--limit-concurrency bounds open connections (uvicorn answers 503 to a request arriving
    with that many open, its own included) and
    --timeout-keep-alive closes an idle keep-alive connection."""
    import socket
    import time
    from urllib.parse import urlparse

    from tests.serve.conftest import Server

    server = Server(serving_artifact, tmp_path / "limits.log", "--limit-concurrency", "2",
                    "--timeout-keep-alive", "1", "--max-context", "64").wait_ready()
    try:
        url = urlparse(server.url)
        with socket.create_connection((url.hostname, url.port)) as held:
            held.settimeout(5)
            held.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"}"):               # the whole JSON answer; kept alive
                answer += held.recv(4096)
            assert b"200 OK" in answer
            assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503
            start = time.monotonic()
            assert held.recv(4096) == b""                  # closed by the server when idle
            assert time.monotonic() - start < 3
        deadline = time.monotonic() + 5
        while httpx.get(f"{server.url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        server.stop()


def test_a_stream_cut_by_the_drain_timeout_ends_with_an_error_event(serving_artifact, tmp_path):
    """SIGTERM with --drain-timeout 0.1 and requests that need longer (900 tokens: > 0.5 s
    here): the stream gets a final error event (code shutting_down) and [DONE], the plain
    request a 503, not a connection closed mid-answer; the server still exits 0."""
    from tests.serve.conftest import Server

    server = Server(serving_artifact, tmp_path / "drain.log", "--drain-timeout", "0.1",
                    "--max-context", "1024").wait_ready()
    try:
        plain = {}
        sender = threading.Thread(target=lambda: plain.update(response=httpx.post(
            f"{server.url}/v1/completions", json=LONG, timeout=30)))
        sender.start()
        events = stream_then_sigterm(server, {**LONG, "stream": True})
        assert events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])["error"]
        assert error["code"] == "shutting_down" and "drain timeout ran out" in error["message"]
        assert len(events) < 900            # it was cut, not finished
        sender.join(timeout=30)
        assert plain["response"].status_code == 503, plain["response"].text
        assert plain["response"].json()["error"]["code"] == "shutting_down"
        assert server.proc.wait(timeout=20) == 0, server.output()
    finally:
        server.stop()
