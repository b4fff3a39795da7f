"""The files that let standard clients open a concat-layout artifact with nothing written by
hand (docs/contract.md, "Artifact directory"):

- genai_config.json, for onnxruntime-genai (`og.Model(artifact_dir)`): the decoder's file and
  tensor names, its head counts and sizes, the special token ids and the search defaults. The
  schema is onnxruntime-genai's config parser (src/config.cpp: an unknown key is an error), and
  the values follow its model builder (src/python/py/models/builders/base.py:
  `make_genai_config`).
- config.json, the checkpoint's Hugging Face config, for Optimum's
  `ORTModelForCausalLM.from_pretrained(artifact_dir)` (transformers' AutoConfig reads it).

Neither client registers the MoE ops: ONNX Runtime runs the model-local functions (domain
`mixbuild`) that every artifact carries.

The ids and defaults are those `mixbuild run` uses on the artifact
(mixbuild/runtime/sampling.py: `GenerationDefaults`): generation_config.json first, then the
config.json spec, so both runtimes stop and pad alike and decode greedily unless the
checkpoint's generation config samples.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixbuild.contract import (
    ATTENTION_MASK,
    GENAI_CONFIG_FILE,
    HF_CONFIG_FILE,
    INPUT_IDS,
    LOGITS,
    ONNX_FILE,
    POSITION_IDS,
    past_key,
    past_value,
    present_key,
    present_value,
)
from mixbuild.model.checkpoint import Checkpoint
from mixbuild.model.generation import GenerationConfig

# onnxruntime-genai has no "mixtral" type (src/models/model_type.h: ModelType::IsLLM); "decoder"
# is its generic decoder-only type, and the graph is opaque to it anyway.
GENAI_MODEL_TYPE = "decoder"


def write_client_configs(directory: Path, ckpt: Checkpoint) -> dict[str, dict[str, Any]]:
    """Write every client file into the artifact `directory`; {file name: what it holds}."""
    return {GENAI_CONFIG_FILE: write_genai_config(directory, ckpt),
            HF_CONFIG_FILE: write_hf_config(directory, ckpt)}


def write_genai_config(directory: Path, ckpt: Checkpoint) -> dict[str, Any]:
    """genai_config.json for onnxruntime-genai; returns the dict written."""
    spec = ckpt.spec
    read = GenerationConfig.read(ckpt.path, spec.eos_token_id, spec.vocab_size)
    generation, eos, pad = read.fields, read.eos_token_ids, read.pad_token_id
    vocab = spec.vocab_size
    bos = read.token_id("bos_token_id")
    if bos is None:
        bos = spec.bos_token_id
    model: dict[str, Any] = {
        "type": GENAI_MODEL_TYPE,
        "context_length": spec.max_position_embeddings,
        "vocab_size": vocab,
        "pad_token_id": pad,
        "decoder": {
            "filename": ONNX_FILE,
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "hidden_size": spec.hidden_size,
            "head_size": spec.head_dim,
            "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads,
            "num_hidden_layers": spec.num_layers,
            "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK,
                       "position_ids": POSITION_IDS,
                       "past_key_names": _template(past_key),
                       "past_value_names": _template(past_value)},
            "outputs": {"logits": LOGITS,
                        "present_key_names": _template(present_key),
                        "present_value_names": _template(present_value)},
        },
    }
    if bos is not None:
        model["bos_token_id"] = bos
    if eos:
        model["eos_token_id"] = eos[0] if len(eos) == 1 else list(eos)
    config = {"model": model, "search": _search(generation, spec.max_position_embeddings)}
    _write_json(directory / GENAI_CONFIG_FILE, config)
    return config


def write_hf_config(directory: Path, ckpt: Checkpoint) -> dict[str, Any]:
    """config.json: the checkpoint's Hugging Face config as it is, with `use_cache` on (the
    graph takes and returns the KV cache); returns the dict written."""
    config = json.loads((ckpt.path / HF_CONFIG_FILE).read_text())  # the spec parsed it already
    config["use_cache"] = True
    _write_json(directory / HF_CONFIG_FILE, config)
    return config


def _search(generation: dict[str, Any], context: int) -> dict[str, Any]:
    """genai's search defaults: greedy, or sampling with the filters generation_config.json
    sets (transformers' defaults otherwise), as `mixbuild run` decodes. max_length counts
    prompt and new tokens (genai has no max_new_tokens default); one beam, as mixbuild has no
    beam search. The graph concatenates past and new K/V, so present is one step longer than
    past: genai must not share one buffer between them (past_present_share_buffer)."""
    def number(key: str, default: float) -> float:
        value = generation.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        return float(value) if ok else default

    top_k = generation.get("top_k")
    return {
        "do_sample": generation.get("do_sample") is True,
        "max_length": context,
        "min_length": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": False,
        "temperature": number("temperature", 1.0),
        "top_k": top_k if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0
        else 50,
        "top_p": min(number("top_p", 1.0), 1.0),
        "repetition_penalty": number("repetition_penalty", 1.0),
        "early_stopping": True,
        "length_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "diversity_penalty": 0.0,
    }


def _template(name_for: Callable[[int], str]) -> str:
    """A per-layer tensor name as genai's printf template: past_key_values.%d.key."""
    return name_for(0).replace(".0.", ".%d.", 1)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
