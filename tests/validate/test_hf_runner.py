"""HFRunner's debug outputs mean what the mixbuild reference model's debug outputs mean."""

import numpy as np
import torch

from mixbuild.model.presets import PRESETS
from mixbuild.runtime.runner import prefill_feeds
from mixbuild.runtime.torch_runner import TorchRunner
from mixbuild.validate.hf_runner import HFRunner


def feeds():
    spec = PRESETS["tiny-e4k1-mqa"]
    ids = np.random.default_rng(0).integers(3, spec.vocab_size, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[1, :3] = 0
    return spec, ids, mask, prefill_feeds(spec, ids, mask)


def test_debug_outputs_match_the_reference_model(hf_checkpoints):
    spec, _ids, mask, f = feeds()
    hf = HFRunner(hf_checkpoints["tiny-e4k1-mqa"], router_logits=True, hidden_states=True,
                  moe_inputs=True)
    ours = TorchRunner.from_checkpoint(hf_checkpoints["tiny-e4k1-mqa"], debug=True).infer(f)
    theirs = hf.infer(f)
    real, tokens = mask.astype(bool), mask.reshape(-1).astype(bool)
    for i in range(spec.num_layers):  # the last layer too: its output, not the final-normed state
        hidden = f"debug.{i}.hidden"
        assert theirs[hidden].shape == (2, 7, spec.hidden_size)
        np.testing.assert_allclose(theirs[hidden][real], ours[hidden][real], atol=1e-5)
        np.testing.assert_allclose(theirs[f"debug.{i}.router_logits"][tokens],
                                   ours[f"debug.{i}.router_logits"][tokens], atol=1e-5)
        assert theirs[f"debug.{i}.expert_ids"].dtype == np.int32
        assert (theirs[f"debug.{i}.expert_ids"][tokens] == ours[f"debug.{i}.expert_ids"][tokens]).all()
        assert theirs[f"debug.{i}.moe_input"].shape == (14, spec.hidden_size)


def test_transformers_last_hidden_state_is_final_normed(hf_checkpoints):
    """Why HFRunner hooks the layers: output_hidden_states[-1] is after the final RMSNorm."""
    spec, ids, mask, f = feeds()
    hf = HFRunner(hf_checkpoints["tiny-e4k1-mqa"], hidden_states=True)
    last = hf.infer(f)[f"debug.{spec.num_layers - 1}.hidden"]
    with torch.inference_mode():
        out = hf.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       output_hidden_states=True)
        tied = out.hidden_states[-1].numpy()
        normed = hf.model.model.norm(torch.from_numpy(last)).numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(tied[real], normed[real], atol=1e-5)
    assert np.abs(tied - last)[real].max() > 1e-2


def test_plain_runner_has_no_debug_outputs(hf_checkpoints):
    _, _, _, f = feeds()
    out = HFRunner(hf_checkpoints["tiny-e4k1-mqa"]).infer(f)
    assert not [name for name in out if name.startswith("debug.")]
