"""Kernel configs as data: file naming, nearest-M lookup, defaults, validation."""

from __future__ import annotations

import json

import pytest
import torch

from mixbuild.errors import ArtifactError
from mixbuild.plugins import configs as C


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(C.CONFIG_DIR_ENV, str(tmp_path))
    C.load_configs.cache_clear()
    yield tmp_path
    C.load_configs.cache_clear()


def test_nearest_m_lookup_ties_to_the_smaller_m(config_dir):
    small = C.KernelConfig(block_m=16, block_n=32, block_k=64, group_m=1, num_warps=4, num_stages=2)
    large = C.KernelConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=8,
                           num_stages=3)
    C.write_config_file(config_dir / C.config_file_name(4, 32, 16, "GPU_X", "bf16"),
                        {8: small, 64: large}, {"tuned": True})
    lookup = dict(E=4, N=32, K=16, device="GPU_X", dtype="bf16")
    assert C.get_config(1, **lookup) == small
    assert C.get_config(36, **lookup) == small          # |36-8| == |36-64|: the smaller M
    assert C.get_config(37, **lookup) == large
    assert C.get_config(10_000, **lookup) == large


def test_missing_file_gives_the_default(config_dir):
    got = C.get_config(4, E=4, N=32, K=16, device="GPU_Y", dtype="bf16")
    assert got == C.default_config(4, 4) and not got.problems()
    for M in (1, 64, 4096):
        assert not C.default_config(M, 8).problems()


def test_round_trip_uses_vllm_style_keys(config_dir):
    cfg = C.KernelConfig(block_m=32, block_n=64, block_k=128, group_m=4, num_warps=8, num_stages=5)
    path = C.write_config_file(config_dir / "x.json", {16: cfg})
    data = json.loads(path.read_text())
    assert data["configs"]["16"] == {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128,
                                     "GROUP_SIZE_M": 4, "num_warps": 8, "num_stages": 5}
    assert C.read_config_file(path) == {16: cfg}


@pytest.mark.parametrize("content, match", [
    ("{not json", "cannot read"),
    ('{"format": 2, "configs": {}}', "unexpected layout"),
    ('{"format": 1, "configs": {"1": {"BLOCK_SIZE_M": 12}}}', "invalid"),
    ('{"format": 1, "configs": {"1": {"BLOCK_M": 16}}}', "unknown keys"),
])
def test_bad_files_are_artifact_errors(config_dir, content, match):
    path = config_dir / "bad.json"
    path.write_text(content)
    with pytest.raises(ArtifactError, match=match):
        C.read_config_file(path)


def test_shipped_files_parse_and_are_named_by_their_key():
    files = sorted(C.CONFIG_DIR.glob("*.json"))
    assert files, "no shipped config"
    for path in files:
        table = C.read_config_file(path)
        assert table and all(not cfg.problems() for cfg in table.values())
        key = dict(part.split("=", 1) for part in path.stem.split(","))
        assert set(key) == {"E", "N", "K", "device_name", "dtype"}
        assert key["dtype"] in C.DTYPE_KEYS


def test_keys():
    assert C.dtype_key(torch.bfloat16) == "bf16"
    assert C.dtype_key(torch.float16, "fp8") == "fp8_w8a8"
    assert C.dtype_key(torch.bfloat16, "int4") == "int4_w4a16"
    assert C.device_key("cpu") == "cpu"
