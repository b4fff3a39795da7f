"""Shared fixtures: tiny Hugging Face checkpoints written by transformers itself."""

from __future__ import annotations

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


@pytest.fixture(scope="session", autouse=True)
def concat_by_default():
    """Tests written against the concat layout (past in, present out: most of the runtime,
    exporter, validate and builder tests) export it when they name no layout; the serving
    layout is exported by name where it is tested, and mixbuild's real default (serving) in
    a fresh process by tests/exporter/test_export.py::test_the_default_layout_is_serving."""
    from mixbuild.contract import Layout
    from mixbuild.exporter import export

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export, "DEFAULT_LAYOUT", Layout.CONCAT)
        yield


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
def fixture_fp32_artifact(fixture_dir, tmp_path_factory) -> Path:
    """The trained fixture exported once per session (fp32, no debug outputs), for tests that
    only read it or copy it before damaging it."""
    from mixbuild.exporter.export import export_checkpoint

    return export_checkpoint(fixture_dir, tmp_path_factory.mktemp("fp32-artifact") / "fp32",
                             progress=False)
