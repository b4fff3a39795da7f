"""The mixbuild reference model computes what transformers' MixtralForCausalLM computes."""

import pytest

from mixbuild.runtime.torch_runner import TorchRunner
from mixbuild.validate.hf_runner import HFRunner
from tests.helpers import compare_runners, left_padded_batch

TOL = 1e-4


def compare_greedy(ckpt, input_ids, attention_mask, steps=16):
    hf = HFRunner(ckpt)
    # transformers trims a sliding-window cache; the ONNX contract does not
    return compare_runners(hf, TorchRunner.from_checkpoint(ckpt), input_ids, attention_mask, steps,
                           check_present=hf.spec.sliding_window is None)


@pytest.mark.parametrize("name", ["tiny", "tiny-e4k1-mqa", "tiny-e8k3-mha"])
def test_matches_transformers_batch_left_padded(hf_checkpoints, name):
    from mixbuild.model.presets import PRESETS

    ids, mask = left_padded_batch(PRESETS[name].vocab_size, [9, 4, 6])
    worst, calls = compare_greedy(hf_checkpoints[name], ids, mask)
    assert calls == 17
    assert worst <= TOL


def test_matches_transformers_on_bf16_checkpoint(bf16_checkpoint):
    ids, mask = left_padded_batch(128, [5])
    worst, _ = compare_greedy(bf16_checkpoint, ids, mask, steps=4)
    assert worst <= TOL


def test_matches_transformers_on_trained_fixture(fixture_dir):
    from mixbuild.model.spec import MixtralSpec

    spec = MixtralSpec.from_file(fixture_dir / "config.json")
    ids, mask = left_padded_batch(spec.vocab_size, [12, 7])
    worst, _ = compare_greedy(fixture_dir, ids, mask)
    assert worst <= TOL


def test_sliding_window_matches_transformers(tmp_path):
    from mixbuild.model.presets import PRESETS
    from tests.conftest import save_hf_checkpoint

    spec = PRESETS["tiny"].replace(sliding_window=4)
    ckpt = save_hf_checkpoint(spec, tmp_path / "sw", shard_kb=None)
    ids, mask = left_padded_batch(spec.vocab_size, [8, 8])
    worst, _ = compare_greedy(ckpt, ids, mask, steps=6)
    assert worst <= TOL
