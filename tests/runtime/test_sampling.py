"""SamplingParams validation and the token chooser's filters."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mixbuild.errors import UsageError
from mixbuild.runtime.sampling import GenerationDefaults, SamplingParams, TokenChooser


def test_frozen_and_normalized():
    p = SamplingParams(stop="END", stop_token_ids=5)
    assert p.stop == ("END",) and p.stop_token_ids == (5,)
    with pytest.raises(AttributeError):
        p.temperature = 2.0


def test_top_k_keeps_only_the_k_best():
    logits = np.array([0.0, 5.0, 4.0, 3.0, -1.0], np.float32)
    chooser = TokenChooser(SamplingParams(temperature=1.0, top_k=2, seed=0), 5, [])
    assert {chooser(logits) for _ in range(200)} == {1, 2}


def test_top_p_keeps_the_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    chooser = TokenChooser(SamplingParams(temperature=1.0, top_p=0.7, seed=0), 4, [])
    assert {chooser(np.log(probs)) for _ in range(300)} == {0, 1}


def test_draws_follow_the_distribution():
    probs = np.array([0.6, 0.3, 0.1])
    chooser = TokenChooser(SamplingParams(temperature=1.0, seed=1), 3, [])
    counts = np.bincount([chooser(np.log(probs)) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, probs, atol=0.03)


def test_repetition_penalty_follows_transformers():
    logits = np.array([2.0, -2.0, 1.0], np.float32)
    chooser = TokenChooser(SamplingParams(repetition_penalty=4.0), 3, [0, 1])
    assert chooser(logits) == 2  # 2.0 / 4 = 0.5 < 1.0; -2.0 * 4 = -8
    assert chooser(logits) == 0  # now 2 was seen too: 0.5 vs 0.25


def test_generation_config_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 10,
         "eos_token_id": [2, 7], "pad_token_id": 0}))
    d = GenerationDefaults.read(tmp_path, spec_eos=2)
    assert d.sampling == SamplingParams(max_new_tokens=10, temperature=0.7, top_k=50, top_p=0.9)
    assert d.eos_token_ids == (2, 7) and d.pad_token_id == 0
    greedy = GenerationDefaults.read(tmp_path / "missing", spec_eos=3)
    assert greedy.sampling.greedy and greedy.eos_token_ids == (3,) and greedy.pad_token_id == 3


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(UsageError) as err:
        SamplingParams().replace(topk=3)
    assert "top_k" in str(err.value)


def test_frequency_and_presence_penalties_follow_openai():
    """logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty, counting
    the request's output tokens only (the prompt's do not count, unlike repetition_penalty)."""
    logits = np.array([0.0, 1.0, 0.9, 0.3], np.float32)
    frequency = TokenChooser(SamplingParams(frequency_penalty=0.5), 4, prompt_ids=[2, 2, 2])
    # 1 (1.0); 2 (0.9 > 1.0 - 0.5); 1 (0.5 > 0.9 - 0.5); 2 (0.4 > 1.0 - 2 * 0.5 and > 0.3)
    assert [frequency(logits) for _ in range(4)] == [1, 2, 1, 2]
    presence = TokenChooser(SamplingParams(presence_penalty=0.8), 4, prompt_ids=[])
    # once a token is out it loses 0.8 however often it recurs: 1, 2, then 3 (0.3 > 0.2, 0.1)
    assert [presence(logits) for _ in range(4)] == [1, 2, 3, 1]
    negative = TokenChooser(SamplingParams(frequency_penalty=-1.0), 4, prompt_ids=[])
    assert [negative(logits) for _ in range(3)] == [1, 1, 1]   # a negative penalty rewards


def test_logit_bias_is_added_before_the_choice():
    logits = np.array([0.0, 5.0, 4.0], np.float32)
    assert TokenChooser(SamplingParams(logit_bias={2: 1.5}), 3, [])(logits) == 2
    assert TokenChooser(SamplingParams(logit_bias={1: -100}), 3, [])(logits) == 2
    banned = TokenChooser(SamplingParams(temperature=1.0, seed=0, logit_bias={1: -100, 2: -100}),
                          3, [])
    assert {banned(logits) for _ in range(100)} == {0}
    assert SamplingParams(logit_bias={2: 1.5}) == SamplingParams(logit_bias=((2, 1.5),))


def test_min_tokens_holds_back_the_stop_ids():
    logits = np.array([0.0, 1.0, 9.0], np.float32)        # 2 is the end-of-sequence id here
    chooser = TokenChooser(SamplingParams(min_tokens=3), 3, [], stop_ids={2})
    assert [chooser(logits) for _ in range(4)] == [1, 1, 1, 2]
    assert not chooser.plain_greedy
    assert TokenChooser(SamplingParams(), 3, [], stop_ids={2}).plain_greedy


@pytest.mark.parametrize("changes, name", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"logit_bias": {3: 101}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 9, "max_new_tokens": 8}, "min_tokens"),
])
def test_openai_sampling_values_are_checked(changes, name):
    with pytest.raises(UsageError, match=f"'{name}'"):
        SamplingParams(**changes)
    with pytest.raises(UsageError, match="outside the vocabulary"):
        SamplingParams(logit_bias={7: 1.0}).check_vocab(7)
