"""A checkpoint's (or artifact's) generation_config.json, and the token ids in it, checked.

The runtime (its generation defaults) and the exporter (onnxruntime-genai's config) read the
same file with the same rules: eos ids from the file, else config.json's; pad from the file,
else the first eos id; every id an integer inside the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixbuild.contract import HF_GENERATION_FILE
from mixbuild.errors import ConfigError
from mixbuild.jsonfile import read_json_object


def token_ids(value, vocab_size: int | None = None, what: str = "token ids",
              allow_list: bool = True) -> tuple[int, ...]:
    """None, one id or a list of ids (as configs write eos_token_id) -> a tuple of ids. Each
    must be an integer (a bool or a float is refused, not truncated) and, when `vocab_size` is
    given, in [0, vocab_size); a ConfigError naming `what` and the value otherwise."""
    if value is None:
        return ()
    many = isinstance(value, (list, tuple)) and allow_list
    values = list(value) if many else [value]
    for v in values:
        integer = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        if integer and v >= 0 and (vocab_size is None or v < vocab_size):
            continue
        valid = f"integers in [0, {vocab_size})" if vocab_size is not None else "integers >= 0"
        raise ConfigError(f"{what} holds {v!r}, which is "
                          + ("not a token id" if not integer else "outside the vocabulary"),
                          expected=f"{'a token id or a list of them' if allow_list else 'a token id'}"
                                   f": {valid}" + (f" (vocab_size {vocab_size})" if vocab_size else ""),
                          found=repr(value)[:200],
                          hint="fix the file: token ids come from this model's tokenizer")
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class GenerationConfig:
    path: Path
    fields: dict[str, Any]           # the file's JSON object ({} when there is no file)
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    vocab_size: int | None = None

    def token_id(self, name: str) -> int | None:
        """One more single-id field of the file (e.g. bos_token_id), checked, or None."""
        value = self.fields.get(name)
        if value is None:
            return None
        return token_ids(value, self.vocab_size, f"{self.path}: {name}", allow_list=False)[0]

    @classmethod
    def read(cls, directory: Path, spec_eos: int | list[int] | None,
             vocab_size: int | None = None) -> GenerationConfig:
        path = Path(directory) / HF_GENERATION_FILE
        fields = read_json_object(path, ConfigError, "generation config") if path.is_file() else {}
        if "eos_token_id" in fields:
            eos = token_ids(fields["eos_token_id"], vocab_size, f"{path}: eos_token_id")
        else:
            eos = token_ids(spec_eos, vocab_size, "config.json: eos_token_id")
        pad = fields.get("pad_token_id")
        if pad is not None:
            (pad,) = token_ids(pad, vocab_size, f"{path}: pad_token_id", allow_list=False)
        else:
            pad = eos[0] if eos else 0
        return cls(path, fields, eos, pad, vocab_size)
