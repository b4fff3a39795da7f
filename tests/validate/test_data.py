"""Evaluation data: prompts files, tokenization, chunking, left-padded batches."""

import json

import numpy as np
import pytest

from mixbuild.errors import MixbuildError
from mixbuild.validate.data import (
    DEFAULT_TEXT,
    Batch,
    PromptFormat,
    default_texts,
    encode_texts,
    evaluation_batches,
    load_prompts,
    load_tokenizer,
    make_batches,
)


def test_default_text_is_python_source_of_a_few_kb():
    compile(DEFAULT_TEXT, "<default>", "exec")
    assert 2000 <= len(DEFAULT_TEXT.encode()) <= 16000
    assert default_texts() == [DEFAULT_TEXT]


def test_text_prompts_are_blank_line_separated_blocks(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("def f(x):\n    return x\n\n\n\nclass A:\n    pass\n  \nimport os\n")
    assert load_prompts(path) == ["def f(x):\n    return x", "class A:\n    pass", "import os"]


def test_jsonl_prompts_with_text_or_prompt(tmp_path):
    path = tmp_path / "prompts.data"  # the name does not decide the format
    path.write_text('{"text": "import os"}\n\n{"prompt": "def main():", "id": 3}\n')
    assert load_prompts(path) == ["import os", "def main():"]
    assert load_prompts(path, PromptFormat.JSONL) == ["import os", "def main():"]


def test_explicit_text_format_keeps_braces(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('{"a": 1}\n')
    assert load_prompts(path, "text") == ['{"a": 1}']


@pytest.mark.parametrize("content, message", [
    ("", "no prompts"),
    ("\n  \n\n", "no prompts"),
    ('{"text": "ok"}\n{"text": "broken"\n', r"p\.jsonl:2: not a JSON object"),
    ('{"text": "ok"}\n["a list"]\n', r"p\.jsonl:2: expected a JSON object"),
    ('{"body": "x"}\n', r"p\.jsonl:1: object has no \"text\" or \"prompt\""),
    ('{"text": 42}\n', r"\"text\" must be a non-empty string"),
    ('{"prompt": "  "}\n', r"\"prompt\" must be a non-empty string"),
])
def test_bad_prompt_files(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(MixbuildError, match=message):
        load_prompts(path)


def test_prompt_file_errors(tmp_path):
    with pytest.raises(MixbuildError, match="prompts file not found"):
        load_prompts(tmp_path / "missing.txt")
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(MixbuildError, match="not UTF-8"):
        load_prompts(binary)
    with pytest.raises(MixbuildError, match="unknown prompts format"):
        load_prompts(binary, "csv")


def test_tokenizer_loading(char_tokenizer, tmp_path):
    assert load_tokenizer(char_tokenizer).token_to_id("<s>") == 1
    assert load_tokenizer(char_tokenizer.parent).token_to_id("<s>") == 1  # a directory
    with pytest.raises(MixbuildError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"nothing": True}))
    with pytest.raises(MixbuildError, match="cannot be read"):
        load_tokenizer(bad)


def test_chunking_with_bos(char_tokenizer):
    tok = load_tokenizer(char_tokenizer)
    text = "abcdefghij" * 3  # 30 characters -> 30 tokens
    seqs = encode_texts(tok, [text, "xyz"], max_tokens=8, bos_id=1)
    assert [len(s) for s in seqs] == [8, 8, 8, 8, 3, 4]
    assert all(s[0] == 1 and s.dtype == np.int64 for s in seqs)
    assert tok.decode(seqs[0][1:].tolist()).replace(" ", "") == "abcdefg"
    assert len(encode_texts(tok, [text], max_tokens=10, max_sequences=2)) == 2
    with pytest.raises(MixbuildError, match="max_tokens is too small"):
        encode_texts(tok, [text], max_tokens=1, bos_id=1)


def test_left_padded_batches():
    seqs = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]
    first, second = make_batches(seqs, batch_size=2, pad_id=0)
    assert first.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert first.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert second.input_ids.tolist() == [[9, 10]]
    assert first.tokens == 4 and first.input_ids.dtype == np.int64
    with pytest.raises(MixbuildError, match="batch_size"):
        make_batches(seqs, 0)


def test_batch_checks_shapes_and_dtypes():
    with pytest.raises(MixbuildError, match="one shape"):
        Batch(np.zeros((2, 3), np.int64), np.zeros((2, 4), np.int64))
    with pytest.raises(MixbuildError, match="int64"):
        Batch(np.zeros((2, 3), np.int32), np.zeros((2, 3), np.int64))


def test_evaluation_batches_from_default_text_and_file(char_tokenizer, tmp_path):
    batches = evaluation_batches(char_tokenizer, max_tokens=64, batch_size=3, bos_id=1)
    total = sum(b.tokens for b in batches)
    assert total == len(DEFAULT_TEXT) + sum(b.input_ids.shape[0] for b in batches)  # + one BOS each
    assert all(b.input_ids.shape[1] <= 64 for b in batches)
    prompts = tmp_path / "p.txt"
    prompts.write_text("import os\n\nclass A:\n    pass\n")
    batches = evaluation_batches(char_tokenizer, prompts=prompts, batch_size=8)
    assert len(batches) == 1 and batches[0].input_ids.shape == (2, len("class A:\n    pass"))
