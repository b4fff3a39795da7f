"""The body of `mixbuild run`: load a model, generate for one prompt, print the text and the
latency figures users ask about (time to first token, tokens per second)."""

from __future__ import annotations

import time
from collections.abc import Callable

import click

from mixbuild.runtime.generate import Result


def cli_run(path: str, prompt: str, *, backend: str = "auto", device: str = "cpu",
            stream: bool = False, chat: bool = False, threads: int | None = None,
            accuracy_level: int = 1, echo: Callable[..., None] = click.echo,
            **sampling) -> Result:
    """Generate for `prompt` and print it; `sampling` holds SamplingParams fields (None = the
    artifact's default). With `chat` the prompt is one user message through the chat template."""
    from mixbuild.runtime.api import load

    check_text(prompt, "--prompt")
    for stop in sampling.get("stop") or ():
        check_text(stop, "--stop")
    start = time.perf_counter()
    model = load(path, backend=backend, device=device, threads=threads, max_batch=1,
                 accuracy_level=accuracy_level)
    loaded = time.perf_counter() - start
    overrides = {k: v for k, v in sampling.items() if v is not None and v != ()}
    messages = [{"role": "user", "content": prompt}]
    if stream:
        pieces = model.stream_chat(messages, **overrides) if chat else model.stream(prompt, **overrides)
        for piece in pieces:
            echo(piece, nl=False)
        result = pieces.result
        echo()
    else:
        result = model.chat(messages, **overrides) if chat else model.generate(prompt, **overrides)[0]
        echo(result.text)
    echo(summary(result, model.backend, loaded))
    return result


def check_text(value: str, option: str) -> None:
    """Refuse text that is not valid Unicode: on POSIX, argv bytes that are not UTF-8 arrive as
    lone surrogates (PEP 383), which no tokenizer can encode."""
    from mixbuild.errors import UsageError

    bad = next(((i, ord(c)) for i, c in enumerate(value) if 0xD800 <= ord(c) <= 0xDFFF), None)
    if bad is None:
        return
    index, code = bad
    found = (f"byte 0x{code - 0xDC00:02x} at character {index}" if 0xDC80 <= code <= 0xDCFF
             else f"a lone surrogate U+{code:04X} at character {index}")
    raise UsageError(f"{option} is not valid UTF-8 text", expected="UTF-8 text", found=found,
                     hint="pass the text in UTF-8 (convert it with `iconv -t UTF-8`, or set a "
                          "UTF-8 locale in the terminal)")


def summary(result: Result, backend: str, load_s: float | None = None) -> str:
    """One line of latency figures; the load time only when `load_s` is given."""
    t = result.timings
    load = f" | load {load_s:.2f} s" if load_s is not None else ""
    return (f"[{backend}] {t.prompt_tokens} prompt + {t.generated_tokens} generated tokens "
            f"({result.finish_reason.value}){load} | time to first token "
            f"{t.time_to_first_token_s * 1000:.1f} ms | {t.decode_tokens_per_s:.1f} tokens/s decode, "
            f"{t.tokens_per_s:.1f} tokens/s overall")
