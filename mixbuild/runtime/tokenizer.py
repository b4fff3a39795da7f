"""The model's tokenizer (tokenizer.json through the `tokenizers` library), its chat template,
and incremental detokenization for streaming.

Incremental detokenization follows the prefix/read offset scheme of transformers' TextStreamer
and vLLM: a new piece of text is released only when the decoded window grows and does not end
in U+FFFD, so a byte-level token that holds half of a UTF-8 character waits for the rest. The
pieces concatenate to exactly ``decode(all ids)``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from mixbuild.contract import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from mixbuild.errors import ArtifactError, UsageError

REPLACEMENT = "\ufffd"


class Tokenizer:
    """Encode, decode and render chat prompts for one model directory."""

    def __init__(self, backend, config: dict[str, Any], chat_template: str | None) -> None:
        self.backend = backend
        self.config = config
        self.chat_template = chat_template
        self.special = {key: _token_text(config.get(key))
                        for key in ("bos_token", "eos_token", "unk_token", "pad_token")}

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer | None:
        """The directory's tokenizer, or None when it has no tokenizer.json."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            return None
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises its own exception types
            raise ArtifactError(f"cannot read {path}", found=str(exc)[:300]) from exc
        config_path = directory / TOKENIZER_CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        if (directory / CHAT_TEMPLATE_FILE).is_file():
            template = (directory / CHAT_TEMPLATE_FILE).read_text()
        return cls(backend, config, template if isinstance(template, str) else None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def longest_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes of text one token covers: the longest token's own
        spelling in the vocabulary (byte-level and SentencePiece spellings take at least one
        byte per byte they stand for: "Ġ" and "▁" for a space, "<0xE2>" for one byte)."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        return max((len(token.encode("utf-8", "surrogatepass")) for token in vocab), default=1)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """Render `messages` with tokenizer_config.json's chat_template (jinja2, sandboxed,
        with the same environment options as transformers)."""
        if not self.chat_template:
            raise UsageError("this model's tokenizer has no chat template",
                             expected="a 'chat_template' in tokenizer_config.json or chat_template.jinja",
                             hint="format the prompt yourself and call generate()")
        _check_messages(messages)
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **{k: v or "" for k, v in self.special.items()})

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # The template writes the special tokens itself (e.g. {{ bos_token }}), as in transformers.
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        return value.get("content")
    return value if isinstance(value, str) else None


def _check_messages(messages) -> None:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        raise UsageError("chat messages must be a non-empty list of {'role': str, 'content': str}",
                         found=repr(messages)[:200])


def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False,
                                                                   indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise ArtifactError("the tokenizer's chat template does not parse", found=str(exc)) from exc


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces that never split a character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token: int) -> str:
        """Add one token; return the text it completes ('' while a character is incomplete)."""
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset:self.read_offset])
        after = decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the very end)."""
        before = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        after = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before):]
