"""The one table that maps on-disk checkpoint tensor names to the model's weights.

Each row names a Hugging Face tensor (per-expert on-disk layout), its role and its shape as a
function of the spec. Every tensor in a checkpoint must match a row, and every row must be
present, with the shape the row gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mixbuild.model.spec import MixtralSpec

Shape = Callable[[MixtralSpec], tuple[int, ...]]


@dataclass(frozen=True)
class TensorRule:
    role: str           # logical name inside mixbuild
    pattern: str        # on-disk name with {layer} / {expert} placeholders
    shape: Shape

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.pattern

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.pattern


_L = "model.layers.{layer}."
_X = _L + "block_sparse_moe.experts.{expert}."

TENSOR_TABLE: tuple[TensorRule, ...] = (
    TensorRule("embed", "model.embed_tokens.weight", lambda s: (s.vocab_size, s.hidden_size)),
    TensorRule("final_norm", "model.norm.weight", lambda s: (s.hidden_size,)),
    TensorRule("lm_head", "lm_head.weight", lambda s: (s.vocab_size, s.hidden_size)),
    TensorRule("input_norm", _L + "input_layernorm.weight", lambda s: (s.hidden_size,)),
    TensorRule("post_norm", _L + "post_attention_layernorm.weight", lambda s: (s.hidden_size,)),
    TensorRule("q_proj", _L + "self_attn.q_proj.weight", lambda s: (s.q_size, s.hidden_size)),
    TensorRule("k_proj", _L + "self_attn.k_proj.weight", lambda s: (s.kv_size, s.hidden_size)),
    TensorRule("v_proj", _L + "self_attn.v_proj.weight", lambda s: (s.kv_size, s.hidden_size)),
    TensorRule("o_proj", _L + "self_attn.o_proj.weight", lambda s: (s.hidden_size, s.q_size)),
    TensorRule("router", _L + "block_sparse_moe.gate.weight",
               lambda s: (s.num_experts, s.hidden_size)),
    TensorRule("w1", _X + "w1.weight", lambda s: (s.intermediate_size, s.hidden_size)),
    TensorRule("w3", _X + "w3.weight", lambda s: (s.intermediate_size, s.hidden_size)),
    TensorRule("w2", _X + "w2.weight", lambda s: (s.hidden_size, s.intermediate_size)),
)

RULES = {rule.role: rule for rule in TENSOR_TABLE}


@dataclass(frozen=True)
class ExpectedTensor:
    name: str
    role: str
    layer: int | None
    expert: int | None
    shape: tuple[int, ...]


def tensor_name(role: str, layer: int | None = None, expert: int | None = None) -> str:
    return RULES[role].pattern.format(layer=layer, expert=expert)


def expected_tensors(spec: MixtralSpec) -> dict[str, ExpectedTensor]:
    """Every tensor a checkpoint of this spec must hold, by on-disk name."""
    out: dict[str, ExpectedTensor] = {}
    for rule in TENSOR_TABLE:
        if rule.role == "lm_head" and spec.tie_word_embeddings:
            continue
        layers = range(spec.num_layers) if rule.per_layer else [None]
        experts = range(spec.num_experts) if rule.per_expert else [None]
        for layer in layers:
            for expert in experts:
                name = rule.pattern.format(layer=layer, expert=expert)
                out[name] = ExpectedTensor(name, rule.role, layer, expert, rule.shape(spec))
    return out
