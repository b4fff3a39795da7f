"""Per-expert output error: each expert of the artifact against the same expert of the reference,
on the reference MoE inputs of the tokens the reference routed to it.

Expert weights come from an ExpertWeights source, one layer at a time (a real model's layer of
experts is gigabytes), as numpy float32 in mixbuild's stacked layout:
    w_gate_up [E, 2I, H] (w1 rows first, then w3),  w_down [E, H, I].

    weights = ExpertWeightPair(hf_expert_weights(hf_runner), checkpoint_expert_weights(ckpt))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

LayerWeights = tuple[np.ndarray, np.ndarray]  # (w_gate_up [E, 2I, H], w_down [E, H, I])


class ExpertWeights(Protocol):
    def reference(self, layer: int) -> LayerWeights:
        ...

    def artifact(self, layer: int) -> LayerWeights:
        ...


@dataclass(frozen=True)
class ExpertWeightPair:
    """An ExpertWeights made of two loaders, each `layer -> (w_gate_up, w_down)`."""

    reference_loader: Callable[[int], LayerWeights]
    artifact_loader: Callable[[int], LayerWeights]

    def reference(self, layer: int) -> LayerWeights:
        return self.reference_loader(layer)

    def artifact(self, layer: int) -> LayerWeights:
        return self.artifact_loader(layer)


def expert_output(x: np.ndarray, w_gate_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """One SwiGLU expert, unweighted: w2(silu(w1 x) * w3 x). x [n, H], w_gate_up [2I, H],
    w_down [H, I] -> [n, H], in float32."""
    gate_up = x.astype(np.float32) @ w_gate_up.astype(np.float32).T
    gate, up = np.split(gate_up, 2, axis=-1)
    silu = gate / (1.0 + np.exp(-gate))
    return (silu * up) @ w_down.astype(np.float32).T


def expert_errors(moe_input: np.ndarray, expert_ids: np.ndarray, reference: LayerWeights,
                  artifact: LayerWeights, relative: bool = False):
    """Max abs output error per expert over the tokens routed to it.

    moe_input [T, H] and expert_ids [T, k] are the reference's; returns (errors [E] float64,
    NaN for an expert no token chose, tokens [E] int64), and with `relative` also the relative
    error [E]: ||art - ref|| / ||ref|| (Frobenius, over the expert's tokens), which compares
    experts and models of any scale."""
    num_experts = reference[0].shape[0]
    errors = np.full(num_experts, np.nan)
    rel = np.full(num_experts, np.nan)
    counts = np.zeros(num_experts, np.int64)
    for expert in range(num_experts):
        rows = np.flatnonzero((expert_ids == expert).any(axis=-1))
        counts[expert] = rows.size
        if rows.size == 0:
            continue
        x = moe_input[rows]
        ref = expert_output(x, reference[0][expert], reference[1][expert])
        art = expert_output(x, artifact[0][expert], artifact[1][expert])
        diff = ref.astype(np.float64) - art
        errors[expert] = float(np.abs(diff).max())
        norm, diff_norm = float(np.linalg.norm(ref)), float(np.linalg.norm(diff))
        rel[expert] = diff_norm / norm if norm > 0 else (0.0 if diff_norm == 0 else np.inf)
    return (errors, counts, rel) if relative else (errors, counts)


# ----------------------------------------------------------------------------- sources
def _numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def torch_expert_weights(model) -> Callable[[int], LayerWeights]:
    """Loader for a mixbuild reference model (mixbuild.model.reference.MixtralModel), or a
    runner holding one as `.model` (TorchRunner)."""
    model = getattr(model, "model", model)
    return lambda layer: (_numpy(model.layers[layer].moe.w_gate_up), _numpy(model.layers[layer].moe.w_down))


def hf_expert_weights(runner) -> Callable[[int], LayerWeights]:
    """Loader for transformers' MixtralForCausalLM (5.x fused experts), or an HFRunner."""
    model = getattr(runner, "model", runner)

    def load(layer: int) -> LayerWeights:
        experts = model.model.layers[layer].mlp.experts
        return _numpy(experts.gate_up_proj), _numpy(experts.down_proj)
    return load


def checkpoint_expert_weights(path: str | Path) -> Callable[[int], LayerWeights]:
    """Loader reading a Hugging Face checkpoint directory lazily, one layer per call."""
    from mixbuild.model.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    ckpt.verify()
    return lambda layer: (_numpy(ckpt.expert_gate_up(layer)), _numpy(ckpt.expert_down(layer)))
