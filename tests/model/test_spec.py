import pytest

from mixbuild.contract import DType
from mixbuild.errors import ConfigError
from mixbuild.model.presets import PRESETS
from mixbuild.model.spec import MixtralSpec


def test_presets_round_trip_through_config_json():
    for spec in PRESETS.values():
        assert MixtralSpec.from_config(spec.to_hf_config()) == spec
        assert MixtralSpec.from_dict(spec.to_dict()) == spec


def test_mixtral_8x7b_parameter_counts():
    counts = PRESETS["mixtral-8x7b"].param_counts()
    assert round(counts["total"] / 1e9, 1) == 46.7
    assert round(counts["active"] / 1e9, 1) == 12.9


def test_mixtral_8x22b_parameter_counts():
    counts = PRESETS["mixtral-8x22b"].param_counts()
    assert round(counts["total"] / 1e9) == 141
    assert round(counts["active"] / 1e9) == 39


def test_bytes_per_precision_orders_sizes():
    sizes = PRESETS["mixtral-8x7b"].bytes_per_precision()
    assert sizes["fp32"] > sizes["bf16"] > sizes["fp8"] > sizes["int4"]
    assert 0.49 < sizes["fp8"] / sizes["bf16"] < 0.52


def test_legacy_config_fields():
    cfg = PRESETS["tiny"].to_hf_config()
    del cfg["rope_parameters"], cfg["head_dim"], cfg["dtype"]
    cfg.update(rope_theta=10000.0, torch_dtype="float16")
    spec = MixtralSpec.from_config(cfg)
    assert spec.rope_theta == 10000.0 and spec.dtype is DType.FP16
    assert spec.head_dim == spec.hidden_size // spec.num_heads


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "unsupported model_type"),
    ({"hidden_size": None}, "required field 'hidden_size' is missing"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok exceeds num_local_experts"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"vocab_size": 12.5}, "field 'vocab_size' must be an integer"),
    ({"num_hidden_layers": 0}, "'num_layers' must be a positive integer"),
    ({"dtype": "int8"}, "unsupported dtype"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act"),
    ({"head_dim": None, "hidden_size": 66}, "head_dim is missing"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "unsupported rope scaling"),
])
def test_bad_configs_name_the_field(change, message):
    cfg = PRESETS["tiny"].to_hf_config()
    for key, value in change.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    with pytest.raises(ConfigError, match=message) as info:
        MixtralSpec.from_config(cfg, source="x/config.json")
    assert "x/config.json" in str(info.value)
