"""transformers' MixtralForCausalLM behind the Runner contract: the validation oracle.

mixbuild never validates against its own reference model; the oracle is transformers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixbuild.model.checkpoint import Checkpoint


class HFRunner:
    name = "transformers"

    def __init__(self, checkpoint: str | Path, dtype: str = "float32", router_logits: bool = False,
                 hidden_states: bool = False) -> None:
        import torch
        from transformers import MixtralForCausalLM

        ckpt = Checkpoint(checkpoint)
        ckpt.verify()  # clear errors before transformers sees the files
        self.spec = ckpt.spec
        self.model = MixtralForCausalLM.from_pretrained(
            str(ckpt.path), dtype=getattr(torch, dtype), attn_implementation="eager").eval()
        self.router_logits, self.hidden_states = router_logits, hidden_states
        self._captured: dict[int, object] = {}
        if router_logits:  # hooks, not output_router_logits: that path also computes an aux loss
            for i, layer in enumerate(self.model.model.layers):
                layer.mlp.gate.register_forward_hook(self._capture(i))

    def _capture(self, index: int):
        def hook(module, args, output):
            self._captured[index] = output[0]
        return hook

    def _cache(self, feeds):
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.spec.num_layers):
            k = torch.from_numpy(np.ascontiguousarray(feeds[f"past_key_values.{i}.key"]))
            if k.shape[2] == 0:
                return cache
            v = torch.from_numpy(np.ascontiguousarray(feeds[f"past_key_values.{i}.value"]))
            cache.update(k.to(self.model.dtype), v.to(self.model.dtype), i)
        return cache

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(feeds["input_ids"]),
                attention_mask=torch.from_numpy(feeds["attention_mask"]),
                position_ids=torch.from_numpy(feeds["position_ids"]),
                cache=self._cache(feeds), use_cache=True,
                output_hidden_states=self.hidden_states)
        result = {"logits": out.logits.float().numpy()}
        for i in range(self.spec.num_layers):
            layer = out.cache.layers[i]
            result[f"present.{i}.key"] = layer.keys.float().numpy()
            result[f"present.{i}.value"] = layer.values.float().numpy()
        if self.router_logits:
            for i in range(self.spec.num_layers):
                result[f"debug.{i}.router_logits"] = self._captured[i].float().numpy()
        if self.hidden_states:
            for i, hidden in enumerate(out.hidden_states[1:]):
                result[f"debug.{i}.hidden"] = hidden.float().numpy()
        return result
