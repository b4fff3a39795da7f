"""Evaluation data: the built-in text, prompts files, tokenization, chunking and batching.

    tokenizer = load_tokenizer(checkpoint_dir)            # its tokenizer.json
    texts = load_prompts("prompts.jsonl") or default_texts()
    batches = make_batches(encode_texts(tokenizer, texts, max_tokens=128, bos_id=1), batch_size=4)

or in one call: ``evaluation_batches(checkpoint_dir, prompts=None, max_tokens=128, batch_size=4)``.
Batches are left-padded (the real tokens end at the last column, as generation expects).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from mixbuild.contract import TOKENIZER_FILE
from mixbuild.errors import UsageError, choice

# Python source in the style of the standard library, the kind of text the fixture model was
# trained on; `encode_texts` cuts it into evaluation sequences.
DEFAULT_TEXT = '''\
import os
import sys
from collections import namedtuple

__all__ = ["walk_files", "read_lines", "Record"]

Record = namedtuple("Record", ["name", "size", "mtime"])


def walk_files(top, suffix=".py", followlinks=False):
    """Yield the paths of the files below *top* whose names end with *suffix*."""
    for dirpath, dirnames, filenames in os.walk(top, followlinks=followlinks):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(suffix):
                yield os.path.join(dirpath, name)


def read_lines(path, encoding="utf-8"):
    """Return the lines of *path* without their trailing newlines."""
    with open(path, encoding=encoding) as f:
        return [line.rstrip("\\n") for line in f]


class LRUCache:
    """A small least-recently-used cache mapping keys to values."""

    def __init__(self, maxsize=128):
        if maxsize <= 0:
            raise ValueError("maxsize must be positive")
        self.maxsize = maxsize
        self._data = {}

    def __len__(self):
        return len(self._data)

    def __contains__(self, key):
        return key in self._data

    def get(self, key, default=None):
        try:
            value = self._data.pop(key)
        except KeyError:
            return default
        self._data[key] = value
        return value

    def put(self, key, value):
        self._data.pop(key, None)
        self._data[key] = value
        while len(self._data) > self.maxsize:
            oldest = next(iter(self._data))
            del self._data[oldest]

    def __repr__(self):
        return "%s(maxsize=%r, size=%r)" % (type(self).__name__, self.maxsize, len(self))


def parse_header(line):
    """Split a header line into a lower-case key and a dictionary of parameters."""
    parts = [part.strip() for part in line.split(";")]
    key = parts[0].lower()
    params = {}
    for item in parts[1:]:
        if "=" not in item:
            continue
        name, _, value = item.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        params[name.strip().lower()] = value
    return key, params


def format_size(num, suffix="B"):
    for unit in ("", "K", "M", "G", "T"):
        if abs(num) < 1024.0:
            return "%3.1f%s%s" % (num, unit, suffix)
        num /= 1024.0
    return "%.1f%s%s" % (num, "P", suffix)


class Counter(dict):
    """Dict subclass for counting hashable items."""

    def __init__(self, iterable=None, **kwds):
        super().__init__()
        self.update(iterable, **kwds)

    def __missing__(self, key):
        return 0

    def update(self, iterable=None, **kwds):
        if iterable is not None:
            if isinstance(iterable, dict):
                for elem, count in iterable.items():
                    self[elem] = count + self.get(elem, 0)
            else:
                for elem in iterable:
                    self[elem] += 1
        if kwds:
            self.update(kwds)

    def most_common(self, n=None):
        items = sorted(self.items(), key=lambda kv: kv[1], reverse=True)
        return items if n is None else items[:n]

    def total(self):
        return sum(self.values())


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Count the words in files.")
    parser.add_argument("paths", nargs="+")
    parser.add_argument("-n", "--top", type=int, default=10)
    args = parser.parse_args(argv)
    counts = Counter()
    for path in args.paths:
        for line in read_lines(path):
            counts.update(line.split())
    for word, count in counts.most_common(args.top):
        print("%7d %s" % (count, word))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


@dataclass(frozen=True)
class Batch:
    """Left-padded token ids and their mask, both int64 [B, S]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray

    def __post_init__(self) -> None:
        ids, mask = self.input_ids, self.attention_mask
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise UsageError("a batch needs input_ids and attention_mask of one shape [B, S]",
                             found=f"{ids.shape} and {mask.shape}")
        if ids.dtype != np.int64 or mask.dtype != np.int64:
            raise UsageError("batch arrays must be int64", found=f"{ids.dtype}, {mask.dtype}")

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


class PromptFormat(str, Enum):
    AUTO = "auto"    # JSONL when the first non-blank line starts with '{', else text
    TEXT = "text"    # prompts separated by blank lines
    JSONL = "jsonl"  # one JSON object per line with "text" or "prompt"


def default_texts() -> list[str]:
    """The built-in evaluation text (one text; chunking makes the sequences)."""
    return [DEFAULT_TEXT]


def load_prompts(path: str | Path, fmt: PromptFormat | str = PromptFormat.AUTO) -> list[str]:
    """Prompts from a file: plain text (one prompt per blank-line-separated block) or JSONL
    (objects with a "text" or "prompt" string). The format is `fmt`; AUTO decides by content,
    never by file name. Raises UsageError naming the file (and line) for anything unusable."""
    path = Path(path)
    fmt = _parse_format(fmt)
    if not path.is_file():
        raise UsageError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: prompts file is not UTF-8 text", found=str(exc)) from exc
    if fmt is PromptFormat.AUTO:
        first = next((line for line in text.splitlines() if line.strip()), "")
        fmt = PromptFormat.JSONL if first.lstrip().startswith("{") else PromptFormat.TEXT
    prompts = _parse_jsonl(text, path) if fmt is PromptFormat.JSONL else _parse_text(text)
    if not prompts:
        raise UsageError(f"{path}: no prompts in the file",
                         expected="text blocks separated by blank lines, or JSONL objects with "
                                  "\"text\" or \"prompt\"")
    return prompts


def _parse_format(fmt: PromptFormat | str) -> PromptFormat:
    return choice(PromptFormat, fmt, "prompts format")


def _parse_text(text: str) -> list[str]:
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


def _parse_jsonl(text: str, path: Path) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: not a JSON object", found=str(exc),
                             hint="JSONL needs one object per line; for plain text prompts "
                                  "use the text format") from exc
        prompts.append(_prompt_of(obj, where))
    return prompts


def _prompt_of(obj, where: str) -> str:
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object", found=type(obj).__name__)
    key = "text" if "text" in obj else "prompt" if "prompt" in obj else None
    if key is None:
        raise UsageError(f"{where}: object has no \"text\" or \"prompt\"",
                         found=", ".join(sorted(obj)) or "no keys")
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{where}: \"{key}\" must be a non-empty string", found=repr(value)[:80])
    return value


# ----------------------------------------------------------------------------- tokens
def load_tokenizer(path: str | Path):
    """A `tokenizers.Tokenizer` from a checkpoint or artifact directory (its tokenizer.json)
    or from a tokenizer.json file."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"no tokenizer.json at {path}",
                         hint="validate with the checkpoint directory, which holds tokenizer.json")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the tokenizers library raises plain Exception on bad files
        raise UsageError(f"{file}: cannot be read as a tokenizers tokenizer.json",
                         found=str(exc).splitlines()[0][:200]) from exc


def encode_texts(tokenizer, texts: list[str], max_tokens: int, bos_id: int | None = None,
                 max_sequences: int | None = None) -> list[np.ndarray]:
    """Tokenize each text (without the tokenizer's own special tokens) and cut it into
    sequences of at most `max_tokens`, each starting with `bos_id` when given. Returns int64
    arrays, at most `max_sequences` of them."""
    if max_tokens < 1 + (bos_id is not None):
        raise UsageError("max_tokens is too small", expected=f">= {1 + (bos_id is not None)}",
                         found=str(max_tokens))
    width = max_tokens - (bos_id is not None)
    prefix = [bos_id] if bos_id is not None else []
    sequences = []
    for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        ids = encoding.ids
        sequences += [np.asarray(prefix + ids[i:i + width], np.int64)
                      for i in range(0, len(ids), width)]
    return sequences[:max_sequences] if max_sequences is not None else sequences


def make_batches(sequences: list[np.ndarray], batch_size: int, pad_id: int = 0) -> list[Batch]:
    """Group sequences, in order, into left-padded batches of up to `batch_size` rows."""
    if batch_size < 1:
        raise UsageError("batch_size must be at least 1", found=str(batch_size))
    return [_left_pad(sequences[i:i + batch_size], pad_id)
            for i in range(0, len(sequences), batch_size)]


def _left_pad(rows: list[np.ndarray], pad_id: int) -> Batch:
    from mixbuild.runtime.runner import left_pad

    return Batch(*left_pad(rows, pad_id))


def evaluation_batches(tokenizer_path: str | Path, prompts: str | Path | None = None,
                       max_tokens: int = 128, batch_size: int = 4, bos_id: int | None = None,
                       max_sequences: int | None = None) -> list[Batch]:
    """Everything above in one call: the prompts file (or the built-in text), tokenized with
    the tokenizer.json at `tokenizer_path`, chunked and batched."""
    texts = load_prompts(prompts) if prompts is not None else default_texts()
    tokenizer = load_tokenizer(tokenizer_path)
    sequences = [s for s in encode_texts(tokenizer, texts, max_tokens, bos_id, max_sequences)
                 if len(s)]
    if not sequences:
        raise UsageError("the evaluation text produced no tokens")
    return make_batches(sequences, batch_size)


def long_batches(tokenizer_path: str | Path, prompts: str | Path | None, length: int,
                 bos_id: int | None = None, sequences: int = 1) -> list[Batch]:
    """`sequences` batches of one sequence of `length` tokens each, for long-input validation:
    the evaluation text's tokens run on (and are repeated from the start when the text is
    shorter than needed, which makes the later part a long-range copying task the model's
    attention must get right). Each sequence starts with `bos_id` when given."""
    texts = load_prompts(prompts) if prompts is not None else default_texts()
    tokenizer = load_tokenizer(tokenizer_path)
    ids = [i for e in tokenizer.encode_batch(list(texts), add_special_tokens=False) for i in e.ids]
    if not ids:
        raise UsageError("the evaluation text produced no tokens")
    prefix = [bos_id] if bos_id is not None else []
    width = length - len(prefix)
    needed = width * sequences
    stream = (ids * (needed // len(ids) + 1))[:needed]
    rows = [np.asarray(prefix + stream[i * width:(i + 1) * width], np.int64)
            for i in range(sequences)]
    return make_batches(rows, 1)
