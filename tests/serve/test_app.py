"""The ASGI app in-process over stand-in models: what the real model cannot be made to do on
demand (fail a step, refuse while shutting down), and the app's lifespan closing the model."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest
from starlette.testclient import TestClient

from mixbuild.errors import ArtifactError
from mixbuild.runtime.metrics import ServingMetrics
from mixbuild.runtime.sampling import GenerationDefaults
from mixbuild.runtime.scheduler import Event, Overloaded
from mixbuild.serve.app import create_app


class StandIn:
    """What the app uses of a Model; every request ends with `outcome` (an Event or an error
    that submit_ids raises)."""

    continuous_batching = True
    context_limit = 64

    def __init__(self, tokenizer, outcome) -> None:
        self.tokenizer, self.outcome = tokenizer, outcome
        self.spec = SimpleNamespace(vocab_size=2048)
        self.defaults = GenerationDefaults(eos_token_ids=(2,))
        self.scheduler = SimpleNamespace(metrics=ServingMetrics(1))
        self.options = SimpleNamespace(max_batch=1, max_queue=1)
        self.closed = False

    def sampling(self, sampling=None, **overrides):
        return (sampling or self.defaults.sampling).replace(**overrides)

    def submit_ids(self, ids, sampling, *, logprobs=None, on_event=None):
        if isinstance(self.outcome, Exception):
            raise self.outcome
        threading.Thread(target=on_event, args=(self.outcome,)).start()   # another thread
        return SimpleNamespace(cancel=lambda: None)

    def close(self, drain=True, timeout=None) -> None:
        self.closed = True


BODY = {"prompt": "def f(x):", "max_tokens": 4}


def test_a_failing_model_step_is_a_server_error_and_the_app_lives_on(tokenizer):
    model = StandIn(tokenizer, Event(error=ArtifactError("the model step failed: boom")))
    with TestClient(create_app(model, model_name="m")) as client:
        answer = client.post("/v1/completions", json=BODY)
        assert answer.status_code == 500
        assert answer.json()["error"]["type"] == "server_error"
        assert "the model step failed: boom" in answer.json()["error"]["message"]
        with client.stream("POST", "/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as s:
            lines = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        assert "the model step failed: boom" in json.loads(lines[-2])["error"]["message"]
        assert client.get("/health").status_code == 200
        assert not model.closed
    assert model.closed                     # the lifespan closed the model at shutdown


@pytest.mark.parametrize("close_model", [True, False])
def test_close_model_leaves_the_model_to_its_owner(tokenizer, close_model):
    model = StandIn(tokenizer, Event(error=ArtifactError("unused")))
    with TestClient(create_app(model, close_model=close_model)):
        pass
    assert model.closed is close_model


def test_shutting_down_is_503_and_a_full_queue_429(tokenizer):
    closing = Overloaded("the scheduler is closing", reason=Overloaded.SHUTTING_DOWN)   # by reason
    with TestClient(create_app(StandIn(tokenizer, closing))) as client:
        answer = client.post("/v1/completions", json=BODY)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down"
        assert answer.headers["retry-after"] == "1"
    with TestClient(create_app(StandIn(tokenizer, Overloaded("the request queue is full")))) as client:
        answer = client.post("/v1/completions", json=BODY)
        assert answer.status_code == 429 and answer.json()["error"]["code"] == "queue_full"


def test_a_model_without_a_tokenizer_is_refused():
    from mixbuild.errors import UsageError

    with pytest.raises(UsageError, match="needs the model's tokenizer"):
        create_app(StandIn(None, None))
