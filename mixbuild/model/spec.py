"""MixtralSpec: the shape of a Mixtral-family model, read from and written to config.json.

Shape legend used across mixbuild:
    B = batch, S = new tokens, P = past tokens, T = B*S tokens, V = vocab, H = hidden,
    I = expert intermediate, E = experts, k = experts per token, Nq / Nkv = heads, D = head dim.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixbuild.contract import HF_CONFIG_FILE, DType, Precision
from mixbuild.errors import ConfigError
from mixbuild.jsonfile import read_json_object


@dataclass(frozen=True)
class MixtralSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    dtype: DType = DType.BF16
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- validation
    def validate(self, source: str = "spec") -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "num_experts", "top_k", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{source}: field '{name}' must be a positive integer",
                                  expected="an integer > 0", found=repr(value))
        if self.top_k > self.num_experts:
            raise ConfigError(f"{source}: num_experts_per_tok exceeds num_local_experts",
                              expected=f"num_experts_per_tok <= {self.num_experts}",
                              found=f"num_experts_per_tok = {self.top_k}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{source}: num_attention_heads is not a multiple of num_key_value_heads",
                              expected="num_attention_heads % num_key_value_heads == 0",
                              found=f"{self.num_heads} heads, {self.num_kv_heads} kv heads")
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim must be even for rotary embeddings",
                              found=f"head_dim = {self.head_dim}")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not _finite(value):
                raise ConfigError(f"{source}: field '{name}' must be a number",
                                  expected="a finite number > 0", found=repr(value))
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ConfigError(f"{source}: rope_theta and rms_norm_eps must be positive",
                              found=f"rope_theta={self.rope_theta}, rms_norm_eps={self.rms_norm_eps}")
        if self.sliding_window is not None and (not _is_int(self.sliding_window)
                                                or self.sliding_window <= 0):
            raise ConfigError(f"{source}: sliding_window must be null or positive",
                              expected="null or an integer > 0", found=repr(self.sliding_window))
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"{source}: field 'tie_word_embeddings' must be true or false",
                              found=repr(self.tie_word_embeddings))
        if not isinstance(self.dtype, DType):
            raise ConfigError(f"{source}: field 'dtype' must be a DType", found=repr(self.dtype))
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            if value is None or all(_is_int(i) and 0 <= i < self.vocab_size for i in ids):
                continue
            raise ConfigError(f"{source}: field '{name}' must be a token id",
                              expected=f"null or an integer in [0, {self.vocab_size})"
                                       + (", or a list of them" if name == "eos_token_id" else ""),
                              found=repr(value))

    # ----------------------------------------------------------------- config.json
    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = HF_CONFIG_FILE) -> MixtralSpec:
        model_type = config.get("model_type")
        if model_type != "mixtral":
            raise ConfigError(f"{source}: unsupported model_type",
                              expected="model_type 'mixtral' (MixtralForCausalLM)",
                              found=repr(model_type),
                              hint="mixbuild builds Mixtral-family checkpoints only")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: unsupported hidden_act", expected="'silu'", found=repr(act))

        def need(key: str) -> Any:
            if key not in config or config[key] is None:
                raise ConfigError(f"{source}: required field '{key}' is missing",
                                  hint="use the config.json saved with the checkpoint")
            return config[key]

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        head_dim = config.get("head_dim")
        if head_dim is None:
            if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0 or hidden % heads:
                raise ConfigError(f"{source}: head_dim is missing and hidden_size is not a multiple "
                                  "of num_attention_heads",
                                  found=f"hidden_size={hidden}, num_attention_heads={heads}",
                                  hint="add head_dim to config.json")
            head_dim = hidden // heads
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object", found=repr(rope))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: unsupported rope scaling", expected="rope_type 'default'",
                              found=repr(rope_type))
        theta = rope.get("rope_theta", config.get("rope_theta", 1e6))
        dtype = config.get("dtype", config.get("torch_dtype")) or "bfloat16"
        _check_int_fields(config, source)
        try:
            dtype = DType.parse(dtype)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc.what}", expected=exc.expected, found=exc.found) from exc
        kwargs = dict(
            vocab_size=need("vocab_size"), hidden_size=hidden,
            intermediate_size=need("intermediate_size"), num_layers=need("num_hidden_layers"),
            num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim, num_experts=need("num_local_experts"),
            top_k=need("num_experts_per_tok"), rope_theta=_as_float(theta),
            rms_norm_eps=_as_float(config.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=config.get("max_position_embeddings", 32768),
            sliding_window=config.get("sliding_window"),
            tie_word_embeddings=_false_if_null(config.get("tie_word_embeddings")),
            dtype=dtype, bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
        )
        try:
            return cls(**kwargs)
        except ConfigError as exc:  # name the file rather than the in-memory spec
            raise ConfigError(exc.what.replace("spec:", f"{source}:", 1), expected=exc.expected,
                              found=exc.found, hint=exc.hint) from exc

    @classmethod
    def from_file(cls, path: str | Path) -> MixtralSpec:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config not found: {path}",
                              hint="point mixbuild at a Hugging Face checkpoint directory with config.json")
        config = read_json_object(path, ConfigError, "config")
        return cls.from_config(config, source=str(path))

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json transformers writes for this spec (MixtralForCausalLM)."""
        return {
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.top_k, "hidden_act": "silu",
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rms_norm_eps": self.rms_norm_eps, "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window, "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": self.dtype.value, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "router_jitter_noise": 0.0,
        }

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dtype"] = self.dtype.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "spec") -> MixtralSpec:
        """The inverse of to_dict; ConfigError (naming `source` and the field) for anything else:
        not an object, unknown or missing fields, wrong types or values."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object", found=type(data).__name__)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(fields)
        if unknown:
            raise ConfigError(f"{source}: unknown fields", found=", ".join(sorted(map(str, unknown))))
        missing = [name for name, f in fields.items() if name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{source}: required field '{missing[0]}' is missing",
                              expected=", ".join(missing) + " present")
        try:
            dtype = DType.parse(data.get("dtype", "bfloat16"))
        except ConfigError as exc:
            raise ConfigError(f"{source}: field 'dtype': {exc.what}", expected=exc.expected,
                              found=exc.found) from exc
        try:
            return cls(**{**data, "dtype": dtype})
        except ConfigError as exc:  # name the source rather than the in-memory spec
            raise ConfigError(exc.what.replace("spec:", f"{source}:", 1), expected=exc.expected,
                              found=exc.found, hint=exc.hint) from exc

    def replace(self, **changes: Any) -> MixtralSpec:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- sizes
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def _attention_params(self) -> int:
        h = self.hidden_size
        return h * self.q_size * 2 + h * self.kv_size * 2

    def _expert_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def param_counts(self) -> dict[str, int]:
        """Parameter counts by part, plus 'total' and 'active' (per token, top-k experts)."""
        h, v, layers = self.hidden_size, self.vocab_size, self.num_layers
        parts = {
            "embedding": v * h,
            "lm_head": 0 if self.tie_word_embeddings else v * h,
            "attention": layers * self._attention_params(),
            "router": layers * self.num_experts * h,
            "experts": layers * self.num_experts * self._expert_params(),
            "norms": layers * 2 * h + h,
        }
        total = sum(parts.values())
        active = total - layers * (self.num_experts - self.top_k) * self._expert_params()
        return {**parts, "total": total, "active": active}

    def bytes_per_precision(self) -> dict[str, int]:
        """Size of the weights stored at each precision (embeddings, router, norms kept in 16 bit
        for the quantized precisions, as the quantizers do)."""
        counts = self.param_counts()
        high = counts["embedding"] + counts["router"] + counts["norms"] + counts["lm_head"]
        quantizable = counts["total"] - high
        out = {}
        for precision in Precision:
            nbytes = precision.bytes_per_weight
            keep = nbytes if nbytes >= 2 else 2.0
            out[precision.value] = int(quantizable * nbytes + high * keep)
        return out


def _as_float(value: Any) -> Any:
    """A JSON int as float (config.json may write 10000 for 10000.0); anything else as it is,
    for validate() to refuse."""
    try:
        return float(value) if _is_int(value) else value
    except OverflowError:
        return value


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:   # an int too large for a float
        return False


def _false_if_null(value: Any) -> Any:
    return False if value is None else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int_fields(config: dict[str, Any], source: str) -> None:
    """Reject non-integer shape fields before the dataclass sees them (JSON floats, strings)."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "num_local_experts",
                "num_experts_per_tok", "head_dim", "max_position_embeddings"):
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"{source}: field '{key}' must be an integer", found=repr(value))
