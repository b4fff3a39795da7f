"""The real server in a subprocess: the trained fixture exported with the serving layout,
`mixbuild serve` started on 127.0.0.1 with a free port, stopped at the end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
NAME = "tiny"


class Server:
    """One `mixbuild serve` process; `url` is its base URL (http://127.0.0.1:PORT)."""

    def __init__(self, model_dir: Path, log: Path, *args: str, env: dict | None = None) -> None:
        self.log = log
        command = [sys.executable, "-m", "mixbuild", "serve", str(model_dir), "--port", "0",
                   "--threads", "1", "--model-name", NAME, "--no-access-log", *args]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, **(env or {})})
        self.url = ""

    def wait_ready(self, timeout: float = 60.0) -> Server:
        deadline = time.monotonic() + timeout
        while not self.url:
            found = re.search(r"OpenAI API at (http://127\.0\.0\.1:\d+)/v1", self.output())
            if found:
                self.url = found.group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start (exit {self.proc.poll()}):\n{self.output()}")
            else:
                time.sleep(0.05)
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server never answered /health:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """The /metrics samples without labels, and labelled ones under their full text."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def serving_artifact(fixture_fp32_artifact) -> Path:
    return fixture_fp32_artifact        # the default export: the serving layout


@pytest.fixture(scope="session")
def servers(serving_artifact, tmp_path_factory):
    """Every server the suite talks to, started together (each takes about a second):
    main: 8 slots, API key, prefill chunks of 32 tokens (long prompts are chunked);
    small: 1 slot and a queue of 1 (the queue-full and SIGTERM tests; SIGTERM ends it);
    threads: --no-batching, the thread-per-request baseline."""
    logs = tmp_path_factory.mktemp("serve-logs")
    started = {
        "main": Server(serving_artifact, logs / "main.log", "--max-context", "1024",
                       "--step-tokens", "32", env={"MIXBUILD_API_KEY": API_KEY}),
        "small": Server(serving_artifact, logs / "small.log", "--max-batch", "1",
                        "--max-queue", "1", "--max-context", "512"),
        "threads": Server(serving_artifact, logs / "threads.log", "--no-batching",
                          "--max-context", "256"),
    }
    try:
        yield {name: server.wait_ready() for name, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="session")
def server(servers) -> Server:
    return servers["main"]


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="session")
def http(server):
    """Raw HTTP to the main server, authorized."""
    with httpx.Client(base_url=server.url, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as raw:
        yield raw


@pytest.fixture(scope="session")
def tokenizer(fixture_dir):
    """The served model's tokenizer (the artifact carries the checkpoint's files)."""
    from mixbuild.runtime.tokenizer import Tokenizer

    return Tokenizer.from_dir(fixture_dir)
