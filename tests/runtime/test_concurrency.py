"""One loaded model serves concurrent generate calls; each equals its sequential run."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.runtime.conftest import PROMPTS

JOBS = [(PROMPTS[i % 3] + " " * (i // 3), dict(temperature=0.8, top_k=40, seed=100 + i,
                                                max_new_tokens=12)) for i in range(8)]


# torch's intra-op pool oversubscribes 2 cores badly under 8 threads: fewer tokens there
@pytest.mark.parametrize("backend, tokens",
                         [("ort", 12), ("ort_feed", 12), ("ort_device", 12), ("torch", 4)])
def test_eight_threads_match_the_sequential_run(request, backend, tokens):
    model = request.getfixturevalue(f"{backend}_model")
    jobs = [(prompt, {**sampling, "max_new_tokens": tokens}) for prompt, sampling in JOBS]
    sequential = [model.generate(prompt, **sampling)[0] for prompt, sampling in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(model.generate, prompt, **sampling) for prompt, sampling in jobs]
        concurrent = [f.result()[0] for f in futures]
    assert [r.token_ids for r in concurrent] == [r.token_ids for r in sequential]
    assert [r.text for r in concurrent] == [r.text for r in sequential]
    assert len({tuple(r.token_ids) for r in sequential}) > 4  # the jobs really differ


def test_concurrent_streams(ort_model):
    streams = [ort_model.stream(prompt, **sampling) for prompt, sampling in JOBS[:4]]
    with ThreadPoolExecutor(max_workers=4) as pool:
        texts = list(pool.map(lambda s: "".join(s), streams))
    expected = [ort_model.generate(prompt, **sampling)[0].text for prompt, sampling in JOBS[:4]]
    assert texts == expected
