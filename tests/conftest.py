"""Shared fixtures: tiny Hugging Face checkpoints written by transformers itself."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

# Triton reads TRITON_INTERPRET when a @triton.jit function is defined, and some libraries the
# tests import define theirs at import time (compressed-tensors does, at collection): set it
# here, before any test module is imported, so every kernel runs in the CPU interpreter
# (tests/plugins/conftest.py relies on it too).
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from mixbuild.model.presets import PRESETS

FIXTURE = Path(__file__).resolve().parents[1] / "mixbuild" / "fixtures" / "tiny-code"


def save_hf_checkpoint(spec, out: Path, dtype=torch.float32, shard_kb: int | None = 64,
                       seed: int = 0, init_std: float = 0.08) -> Path:
    """A random MixtralForCausalLM for `spec`, saved with save_pretrained (sharded by default)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(**{**spec.to_hf_config(), "initializer_range": init_std,
                              "dtype": str(dtype).removeprefix("torch.")})
    model = MixtralForCausalLM(config).to(dtype)
    kwargs = {"max_shard_size": f"{shard_kb}KB"} if shard_kb else {}
    model.save_pretrained(out, **kwargs)
    return out


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Sharded fp32 checkpoints for every tiny preset."""
    root = tmp_path_factory.mktemp("hf")
    return {name: save_hf_checkpoint(spec, root / name)
            for name, spec in PRESETS.items() if name.startswith("tiny")}


@pytest.fixture(scope="session")
def bf16_checkpoint(tmp_path_factory) -> Path:
    return save_hf_checkpoint(PRESETS["tiny"], tmp_path_factory.mktemp("bf16") / "ckpt",
                              dtype=torch.bfloat16, shard_kb=32)


@pytest.fixture
def ckpt_copy(hf_checkpoints, tmp_path) -> Path:
    """A private copy of the sharded 'tiny' checkpoint, for tests that damage it."""
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoints["tiny"], dst)
    return dst


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not (FIXTURE / "config.json").is_file():
        pytest.fail(f"the trained fixture is missing at {FIXTURE}; run `make fixture`")
    return FIXTURE


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """Where the session's shared exports live. Under pytest-xdist (`make test` runs two
    workers) it is the run's common base directory, so what one worker exported the other
    reuses instead of exporting it again."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(parents=True, exist_ok=True)
    return root


def made_once(root: Path, name: str, make) -> Path:
    """root/name, made by `make(path)` unless a process of this run already made it (a lock
    file serializes the workers; a `.done` marker says the directory is complete)."""
    out, done = root / name, root / f"{name}.done"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.exists():
                if out.exists():            # a worker died half way: start again
                    shutil.rmtree(out)
                make(out)
                done.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


@pytest.fixture(scope="session")
def fixture_export(fixture_dir, shared_dir):
    """`fixture_export(**options)`: the trained fixture exported with export_checkpoint's
    `options`, once per test run. Every module (and xdist worker) that asks for the same
    options gets the same directory, so an export several modules need is made once.
    Read-only: tests that damage an artifact copy it first (tests/validate/test_shipped.py
    checks validate never writes)."""
    from mixbuild.exporter.export import export_checkpoint

    def get(**options) -> Path:
        key = hashlib.sha256(repr(sorted(options.items())).encode()).hexdigest()[:16]
        return made_once(shared_dir, f"export-{key}", lambda out: export_checkpoint(
            fixture_dir, out, progress=False, **options))

    return get


# The small calibration most tests need (64 tokens in sequences of 32, nearest rounding): the
# quantized graph, its kernels and files, not its accuracy, which tests/quant/ measures at the
# README's calibration.
SMALL_CALIB = {"calib_tokens": 64, "calib_seq_len": 32, "gptq": False}


def small_quant(precision: str, **options):
    from mixbuild.quant.config import QuantConfig

    return QuantConfig.parse(precision, **SMALL_CALIB, **options)


@pytest.fixture(scope="session")
def fixture_fp32_artifact(fixture_export) -> Path:
    """The trained fixture exported with the defaults (fp32, serving layout, no debug outputs),
    for tests that only read it or copy it before damaging it."""
    return fixture_export()


@pytest.fixture(scope="session")
def fixture_concat_artifact(fixture_export) -> Path:
    """The trained fixture in the concat layout (past in, present out, every position's
    logits): for the tests of that contract and of its clients (Optimum, onnxruntime-genai,
    fp32 TensorRT engines, the per-call runtime steps)."""
    return fixture_export(layout="concat")


@pytest.fixture(scope="session")
def shipped(fixture_dir, shared_dir) -> dict[str, Path]:
    """The fixture exported at fp8 and int4 the way the README does: `mixbuild export FIXTURE -o
    OUT --precision P` with the CLI's default settings (serving layout, the README's calibration,
    no debug outputs). Read-only: tests that damage one copy it."""
    from click.testing import CliRunner

    from mixbuild.cli import main

    def export(out: Path, precision: str) -> None:
        result = CliRunner().invoke(main, ["export", str(fixture_dir), "-o", str(out),
                                           "--precision", precision])
        assert result.exit_code == 0, result.output

    return {p: made_once(shared_dir, f"shipped/{p}", lambda out, p=p: export(out, p))
            for p in ("fp8", "int4")}
