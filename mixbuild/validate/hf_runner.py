"""transformers' MixtralForCausalLM behind the Runner contract: the validation oracle.

mixbuild never validates against its own reference model; the oracle is transformers.

Debug outputs come from forward hooks, never from transformers' own output flags:
- ``output_hidden_states`` returns, as its last entry, the final-normed hidden state (transformers
  5.x ties ``hidden_states[-1]`` to ``last_hidden_state``), not the last decoder layer's output;
  a hook on every decoder layer gives ``debug.{i}.hidden`` [B, S, H] = layer i's output, as the
  mixbuild reference model and the exported debug outputs define it.
- ``output_router_logits`` also computes the auxiliary loss; a hook on each router gives
  ``debug.{i}.router_logits`` [T, E] and ``debug.{i}.expert_ids`` [T, k] int32.
- ``moe_inputs=True`` adds ``debug.{i}.moe_input`` [T, H]: what layer i's MoE block sees (the
  post-attention-normed hidden state), for per-expert error measurements.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixbuild.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    Debug,
    past_key,
    past_value,
    present_key,
    present_value,
)
from mixbuild.model.checkpoint import Checkpoint, check_finite_tensor


class HFRunner:
    name = "transformers"

    def __init__(self, checkpoint: str | Path, dtype: str = "float32", router_logits: bool = False,
                 hidden_states: bool = False, moe_inputs: bool = False) -> None:
        import torch
        from transformers import MixtralForCausalLM

        ckpt = Checkpoint(checkpoint)
        ckpt.verify()  # clear errors before transformers sees the files
        self.spec = ckpt.spec
        self.model = MixtralForCausalLM.from_pretrained(
            str(ckpt.path), dtype=getattr(torch, dtype), attn_implementation="eager").eval()
        _check_finite(self.model, ckpt)
        self.router_logits, self.hidden_states, self.moe_inputs = router_logits, hidden_states, moe_inputs
        self._captured: dict[str, object] = {}
        for i, layer in enumerate(self.model.model.layers):
            if router_logits:
                layer.mlp.gate.register_forward_hook(self._capture_router(i))
            if hidden_states:
                layer.register_forward_hook(self._capture_hidden(i))
            if moe_inputs:
                layer.mlp.register_forward_pre_hook(self._capture_moe_input(i))

    def _capture_router(self, index: int):
        def hook(module, args, output):  # (router_logits [T, E], weights [T, k], ids [T, k])
            self._captured[Debug.ROUTER_LOGITS.name_for(index)] = output[0]
            self._captured[Debug.EXPERT_IDS.name_for(index)] = output[2].to(dtype=_int32())
        return hook

    def _capture_hidden(self, index: int):
        def hook(module, args, output):
            self._captured[Debug.HIDDEN.name_for(index)] = output[0] if isinstance(output, tuple) else output
        return hook

    def _capture_moe_input(self, index: int):
        def hook(module, args):
            x = args[0]
            self._captured[Debug.MOE_INPUT.name_for(index)] = x.reshape(-1, x.shape[-1])
        return hook

    def _cache(self, feeds):
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.spec.num_layers):
            k = torch.from_numpy(np.ascontiguousarray(feeds[past_key(i)]))
            if k.shape[2] == 0:
                return cache
            v = torch.from_numpy(np.ascontiguousarray(feeds[past_value(i)]))
            cache.update(k.to(self.model.dtype), v.to(self.model.dtype), i)
        return cache

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        self._captured.clear()
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(feeds[INPUT_IDS]),
                attention_mask=torch.from_numpy(feeds[ATTENTION_MASK]),
                position_ids=torch.from_numpy(feeds[POSITION_IDS]),
                cache=self._cache(feeds), use_cache=True)
        result = {LOGITS: out.logits.float().numpy()}
        for i in range(self.spec.num_layers):
            layer = out.cache.layers[i]
            result[present_key(i)] = layer.keys.float().numpy()
            result[present_value(i)] = layer.values.float().numpy()
        for name, tensor in self._captured.items():
            result[name] = tensor.numpy() if not tensor.is_floating_point() else tensor.float().numpy()
        self._captured.clear()
        return result


def _check_finite(model, ckpt: Checkpoint) -> None:
    """Refuse (CheckpointError) a reference whose weights hold NaN or Inf: a non-finite oracle
    would make every comparison meaningless. The loaded parameters are checked in memory; only
    when one is not finite is the checkpoint read again, to name the tensor as stored."""
    from mixbuild.tensors import all_finite

    for name, param in model.named_parameters():
        if not all_finite(param.detach()):
            for _ in ckpt.check_values():  # raises naming the stored tensor
                pass
            check_finite_tensor(param, f"{name} (as transformers loaded it)")


def _int32():
    import torch

    return torch.int32
