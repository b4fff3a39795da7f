"""Incremental detokenization never emits a split character; chat templates render."""

from __future__ import annotations

import pytest

from mixbuild.runtime.tokenizer import REPLACEMENT, IncrementalDetokenizer, Tokenizer

TEXTS = ["héllo wörld — naïve café 日本語 🙂🙂 done", "def f():\n    return 'ünïcödé'  # ✓\n"]


@pytest.fixture(scope="module")
def tokenizer(fixture_dir) -> Tokenizer:
    return Tokenizer.from_dir(fixture_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_are_whole_characters_and_concatenate(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # byte-level pieces: some characters span tokens
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert not any(REPLACEMENT in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_a_split_character_waits(tokenizer):
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push(i) for i in ids][:-1] == [""] * (len(ids) - 1)


def test_trailing_partial_character_is_flushed_like_decode(tokenizer):
    ids = tokenizer.encode("a🙂", add_special_tokens=False)[:-1]
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text == tokenizer.decode(ids)


def test_chat_template_renders(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}]
    assert tokenizer.apply_chat_template(messages) == "<s>[INST] hi [/INST]hello</s>[INST] bye [/INST]"
    assert tokenizer.encode_chat(messages)[0] == tokenizer.token_id("<s>")
    assert tokenizer.encode_chat(messages).count(tokenizer.token_id("<s>")) == 1


def test_no_tokenizer_file(tmp_path):
    assert Tokenizer.from_dir(tmp_path) is None
