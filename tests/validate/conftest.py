"""A character-level tokenizer.json small enough for the tiny presets' vocabularies."""

from pathlib import Path

import pytest

from mixbuild.validate.data import DEFAULT_TEXT

SPECIALS = ["<unk>", "<s>", "</s>"]


def write_char_tokenizer(path: Path, text: str = DEFAULT_TEXT) -> Path:
    """tokenizer.json for a BPE with no merges: one token per character of `text`."""
    from tokenizers import Tokenizer, models

    chars = sorted(set(text))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def char_tokenizer(tmp_path_factory) -> Path:
    return write_char_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")
