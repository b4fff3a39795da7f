import json

import pytest
import torch
from safetensors.torch import save_file

from mixbuild.contract import HF_INDEX_FILE
from mixbuild.errors import CheckpointError, ConfigError
from mixbuild.model.checkpoint import Checkpoint
from mixbuild.model.names import expected_tensors


def _shards(path):
    return sorted(path.glob("model-*.safetensors"))


def test_sharded_checkpoint_reads_every_tensor(hf_checkpoints):
    ckpt = Checkpoint(hf_checkpoints["tiny"])
    assert len(_shards(ckpt.path)) > 1
    expected = ckpt.verify()
    assert set(expected) == set(ckpt.tensors)
    assert ckpt.expert_gate_up(1).shape == (8, 2 * 96, 64)
    assert ckpt.expert_down(0).shape == (8, 64, 96)
    assert ckpt.stored_dtypes == ["F32"]


def test_bf16_checkpoint(bf16_checkpoint):
    ckpt = Checkpoint(bf16_checkpoint)
    assert ckpt.stored_dtypes == ["BF16"]
    assert ckpt.weight("w2", 1, 7).dtype == torch.bfloat16
    assert len(list(ckpt.check_values())) == len(ckpt.tensors)


def test_single_file_checkpoint(tmp_path, hf_checkpoints):
    src = Checkpoint(hf_checkpoints["tiny-e4k1-mqa"])
    (tmp_path / "config.json").write_text((src.path / "config.json").read_text())
    save_file({n: src.tensor(n).contiguous() for n in src.tensors}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    ckpt.verify()
    assert torch.equal(ckpt.weight("router", 2), src.weight("router", 2))


def test_missing_shard(ckpt_copy):
    victim = _shards(ckpt_copy)[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard {victim.name}"):
        Checkpoint(ckpt_copy)


def test_truncated_shard(ckpt_copy):
    victim = _shards(ckpt_copy)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="file is truncated") as info:
        Checkpoint(ckpt_copy)
    assert victim.name in str(info.value)


def test_corrupt_header(ckpt_copy):
    victim = _shards(ckpt_copy)[0]
    data = bytearray(victim.read_bytes())
    data[8:12] = b"\xff\xfe{]"
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Checkpoint(ckpt_copy)


def test_missing_tensor(ckpt_copy):
    name = "model.layers.1.block_sparse_moe.experts.5.w3.weight"
    index = json.loads((ckpt_copy / HF_INDEX_FILE).read_text())
    shard = ckpt_copy / index["weight_map"].pop(name)
    tensors = {n: t for n, t in Checkpoint(ckpt_copy).tensors.items() if t.file == shard and n != name}
    from safetensors import safe_open
    with safe_open(str(shard), "pt") as fh:
        kept = {n: fh.get_tensor(n) for n in tensors}
    save_file(kept, shard)
    (ckpt_copy / HF_INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        Checkpoint(ckpt_copy).verify()


def test_wrong_shape(ckpt_copy):
    (ckpt_copy / "config.json").write_text(
        (ckpt_copy / "config.json").read_text().replace('"intermediate_size": 96', '"intermediate_size": 80'))
    with pytest.raises(CheckpointError, match="has the wrong shape") as info:
        Checkpoint(ckpt_copy).verify()
    assert "[80, 64]" in str(info.value) and "[96, 64]" in str(info.value)


def test_unused_tensors(ckpt_copy):
    (ckpt_copy / "config.json").write_text(
        (ckpt_copy / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 1'))
    with pytest.raises(CheckpointError, match="tensors no Mixtral layer uses") as info:
        Checkpoint(ckpt_copy).verify()
    assert "model.layers.1." in str(info.value)


def test_pickled_weights_are_refused(tmp_path, hf_checkpoints):
    (tmp_path / "config.json").write_text((hf_checkpoints["tiny"] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(CheckpointError, match="no safetensors weights") as info:
        Checkpoint(tmp_path)
    assert "never loads pickled" in str(info.value)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="config not found"):
        Checkpoint(tmp_path)


def test_non_finite_values_are_reported(ckpt_copy):
    ckpt = Checkpoint(ckpt_copy)
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = ckpt.tensors[name].file
    from safetensors import safe_open
    with safe_open(str(shard), "pt") as fh:
        tensors = {n: fh.get_tensor(n) for n in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    tensors[name][3, 4] = float("nan")
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=f"'{name}' holds NaN"):
        list(Checkpoint(ckpt_copy).check_values())


def test_expected_table_covers_tied_embeddings():
    from mixbuild.model.presets import PRESETS

    spec = PRESETS["tiny"].replace(tie_word_embeddings=True)
    names = expected_tensors(spec)
    assert "lm_head.weight" not in names
    assert len(names) == 2 + spec.num_layers * (7 + 3 * spec.num_experts)
