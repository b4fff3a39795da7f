"""Greedy generation of the ort and torch backends equals transformers' generate, token for token."""

from __future__ import annotations

import pytest

from tests.runtime.conftest import PROMPTS

NEW_TOKENS = 24


def hf_greedy(hf_model, hf_tokenizer, prompts: list[str]) -> list[list[int]]:
    """transformers' greedy generate with left padding; each row cut after its first eos."""
    import torch

    batch = hf_tokenizer(prompts, return_tensors="pt", padding=True)
    eos = hf_model.generation_config.eos_token_id
    with torch.inference_mode():
        out = hf_model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=hf_tokenizer.pad_token_id)
    rows = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.mark.parametrize("backend", ["ort", "ort_feed", "ort_device", "torch"])
@pytest.mark.parametrize("count", [1, 3])
def test_greedy_equals_transformers(request, backend, count, hf_model, hf_tokenizer):
    model = request.getfixturevalue(f"{backend}_model")
    prompts = PROMPTS[:count]
    expected = hf_greedy(hf_model, hf_tokenizer, prompts)
    results = model.generate(prompts, max_new_tokens=NEW_TOKENS)
    for prompt, result, tokens in zip(prompts, results, expected):
        assert result.prompt_token_ids == hf_tokenizer(prompt)["input_ids"]
        assert result.token_ids == tokens
        assert result.text == hf_tokenizer.decode(tokens, skip_special_tokens=True)


def test_prompts_really_differ_in_length(ort_model):
    lengths = {len(ort_model.tokenizer.encode(p)) for p in PROMPTS}
    assert len(lengths) == 3


def test_chat_template_matches_transformers(ort_model, hf_tokenizer):
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ort_model.tokenizer.apply_chat_template(messages) == rendered
    result = ort_model.chat(messages, max_new_tokens=4)
    assert result.prompt_token_ids == hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert len(result.token_ids) <= 4
