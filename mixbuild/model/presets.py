"""Named model shapes: the real Mixtral sizes and tiny shapes for tests."""

from __future__ import annotations

from mixbuild.contract import DType
from mixbuild.errors import UsageError
from mixbuild.model.spec import MixtralSpec

PRESETS: dict[str, MixtralSpec] = {
    "mixtral-8x7b": MixtralSpec(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, rope_theta=1e6,
        max_position_embeddings=32768),
    "mixtral-8x22b": MixtralSpec(
        vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_layers=56, num_heads=48,
        num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, rope_theta=1e6,
        max_position_embeddings=65536),
    # Tiny shapes for tests: different E, k, head layouts; fp32 so equivalence is exact.
    "tiny": MixtralSpec(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, num_experts=8, top_k=2, max_position_embeddings=512,
        dtype=DType.FP32),
    "tiny-e4k1-mqa": MixtralSpec(
        vocab_size=96, hidden_size=48, intermediate_size=64, num_layers=3, num_heads=6,
        num_kv_heads=1, head_dim=8, num_experts=4, top_k=1, max_position_embeddings=512,
        dtype=DType.FP32),
    "tiny-e8k3-mha": MixtralSpec(
        vocab_size=80, hidden_size=32, intermediate_size=40, num_layers=1, num_heads=2,
        num_kv_heads=2, head_dim=24, num_experts=8, top_k=3, max_position_embeddings=512,
        dtype=DType.FP32),
}


def get_preset(name: str) -> MixtralSpec:
    try:
        return PRESETS[name]
    except KeyError as exc:
        raise UsageError(f"unknown preset '{name}'", expected=", ".join(PRESETS), found=name) from exc
