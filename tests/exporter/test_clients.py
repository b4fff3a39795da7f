"""The client files of a concat-layout artifact (mixbuild/exporter/clients.py): onnxruntime-genai
and Optimum open the exported fixture as it is, with nothing written by hand, and decode the
same greedy tokens as mixbuild's runtime."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

import mixbuild.runtime as rt
from mixbuild.contract import GENAI_CONFIG_FILE, HF_CONFIG_FILE, ONNX_FILE
from mixbuild.exporter.artifact import Artifact
from mixbuild.model.spec import MixtralSpec
from mixbuild.runtime.sampling import GenerationDefaults
from tests.conftest import edit_json

PROMPTS = ["def add(a, b):", "import os\n", "class Stack:\n    def"]
NEW_TOKENS = 16
CHAT = [{"role": "user", "content": "add two numbers"}, {"role": "assistant", "content": "a + b"},
        {"role": "user", "content": "now three"}]

# The keys onnxruntime-genai's config parser accepts where this file writes (src/config.cpp;
# anything else is an "unknown value" error there), for the check that needs no genai.
GENAI_KEYS = {
    "model": {"type", "context_length", "vocab_size", "bos_token_id", "eos_token_id",
              "pad_token_id", "decoder"},
    "decoder": {"filename", "session_options", "hidden_size", "head_size", "num_attention_heads",
                "num_key_value_heads", "num_hidden_layers", "inputs", "outputs"},
    "inputs": {"input_ids", "attention_mask", "position_ids", "past_key_names",
               "past_value_names"},
    "outputs": {"logits", "present_key_names", "present_value_names"},
    "search": {"do_sample", "max_length", "min_length", "num_beams", "num_return_sequences",
               "past_present_share_buffer", "temperature", "top_k", "top_p",
               "repetition_penalty", "early_stopping", "length_penalty", "no_repeat_ngram_size",
               "diversity_penalty"},
}
GENAI_LLM_TYPES = {"decoder", "llama", "mistral"}  # a part of src/models/model_type.h: IsLLM


@pytest.fixture(scope="module")
def artifact(fixture_concat_artifact):
    """Optimum and onnxruntime-genai read the concat layout (`--layout concat`)."""
    return fixture_concat_artifact


@pytest.fixture(scope="module")
def model(artifact):
    return rt.load(artifact, spinning=False)


@pytest.fixture(scope="module")
def expected(model):
    """mixbuild's greedy tokens for PROMPTS, from text (BOS prepended by tokenizer.json)."""
    return [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)]


@pytest.fixture(scope="module")
def genai(artifact):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed "
                             "(pip install -e '.[dev]')")
    return og, og.Model(str(artifact))


def test_client_files_are_hashed_in_the_manifest(artifact):
    files = Artifact.open(artifact).manifest.files   # checks every listed file's sha256
    assert {GENAI_CONFIG_FILE, HF_CONFIG_FILE} <= set(files)


def test_genai_config_follows_the_graph_and_the_schema(artifact, model):
    config = json.loads((artifact / GENAI_CONFIG_FILE).read_text())
    assert set(config) == {"model", "search"}
    m, s = config["model"], config["search"]
    d = m["decoder"]
    for section, keys in (("model", m), ("decoder", d), ("inputs", d["inputs"]),
                          ("outputs", d["outputs"]), ("search", s)):
        assert set(keys) <= GENAI_KEYS[section], section
    assert m["type"] in GENAI_LLM_TYPES
    spec = model.spec
    assert (d["head_size"], d["hidden_size"], d["num_hidden_layers"]) == (
        spec.head_dim, spec.hidden_size, spec.num_layers)
    assert (d["num_attention_heads"], d["num_key_value_heads"]) == (spec.num_heads, spec.num_kv_heads)
    assert (m["vocab_size"], m["context_length"], s["max_length"]) == (
        spec.vocab_size, spec.max_position_embeddings, spec.max_position_embeddings)
    # the templates name exactly the graph's inputs and outputs
    graph = onnx.load(str(artifact / ONNX_FILE), load_external_data=False).graph
    inputs, outputs = [v.name for v in graph.input], [v.name for v in graph.output]
    io = d["inputs"]
    named = [io["input_ids"], io["attention_mask"], io["position_ids"]]
    named += [io[k] % i for i in range(spec.num_layers) for k in ("past_key_names", "past_value_names")]
    assert named == inputs
    named = [d["outputs"]["logits"]]
    named += [d["outputs"][k] % i for i in range(spec.num_layers)
              for k in ("present_key_names", "present_value_names")]
    assert named == outputs
    assert d["filename"] == ONNX_FILE and d["session_options"]["provider_options"] == []
    # the ids mixbuild run uses; greedy like mixbuild run; present grows, so no shared buffer
    defaults = GenerationDefaults.read(artifact, spec.eos_token_id, spec.vocab_size)
    eos = m["eos_token_id"] if isinstance(m["eos_token_id"], list) else [m["eos_token_id"]]
    assert tuple(eos) == defaults.eos_token_ids and m["pad_token_id"] == defaults.pad_token_id
    assert m["bos_token_id"] == spec.bos_token_id == model.tokenizer.encode("x")[0]
    assert s["do_sample"] is False and defaults.sampling.greedy
    assert s["past_present_share_buffer"] is False and s["num_beams"] == 1


def test_config_json_is_the_checkpoint_config(artifact, fixture_dir):
    from transformers import AutoConfig

    written = json.loads((artifact / HF_CONFIG_FILE).read_text())
    original = json.loads((fixture_dir / HF_CONFIG_FILE).read_text())
    assert written == {**original, "use_cache": True}
    assert MixtralSpec.from_file(artifact / HF_CONFIG_FILE) == MixtralSpec.from_file(
        fixture_dir / HF_CONFIG_FILE)
    config = AutoConfig.from_pretrained(artifact)
    assert config.model_type == "mixtral" and config.use_cache
    assert config.num_key_value_heads == written["num_key_value_heads"]


@pytest.fixture
def ckpt_view(fixture_dir, tmp_path):
    """The fixture's config files, editable, beside a link to its weights."""
    from mixbuild.model.checkpoint import Checkpoint

    for f in fixture_dir.iterdir():
        if f.suffix == ".json":
            shutil.copy2(f, tmp_path / f.name)
    (tmp_path / "model.safetensors").symlink_to(fixture_dir / "model.safetensors")
    return lambda: Checkpoint(tmp_path)


def test_genai_ids_and_search_come_from_generation_config(ckpt_view, tmp_path):
    from mixbuild.exporter.clients import write_genai_config

    edit_json(tmp_path / "generation_config.json", eos_token_id=[2, 5], pad_token_id=0,
              do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    out = tmp_path / "out"
    out.mkdir()
    config = write_genai_config(out, ckpt_view())
    assert json.loads((out / GENAI_CONFIG_FILE).read_text()) == config
    defaults = GenerationDefaults.read(tmp_path, None, 2048)
    assert tuple(config["model"]["eos_token_id"]) == defaults.eos_token_ids == (2, 5)
    assert config["model"]["pad_token_id"] == defaults.pad_token_id == 0
    search = config["search"]
    assert (search["do_sample"], search["temperature"], search["top_k"], search["top_p"]) == (
        True, 0.7, 20, 0.9)
    assert (defaults.sampling.temperature, defaults.sampling.top_k) == (0.7, 20)
    (tmp_path / "generation_config.json").unlink()   # then config.json's ids; pad = first eos
    config = write_genai_config(out, ckpt_view())
    assert (config["model"]["eos_token_id"], config["model"]["pad_token_id"]) == (2, 2)
    assert config["search"]["do_sample"] is False


def test_genai_refuses_a_bad_generation_config_id(ckpt_view, tmp_path):
    from mixbuild.errors import ConfigError
    from mixbuild.exporter.clients import write_genai_config

    edit_json(tmp_path / "generation_config.json", pad_token_id=4096)
    with pytest.raises(ConfigError, match=r"pad_token_id holds 4096, which is outside the vocab"):
        write_genai_config(tmp_path, ckpt_view())


def _genai_greedy(og, genai_model, batch) -> list[list[int]]:
    """genai's greedy new tokens for `batch`: one prompt of ids, or a padded [B, L] array (as
    Tokenizer.encode_batch gives it; genai masks its pad_token_id)."""
    import numpy as np

    batch = np.atleast_2d(np.asarray(batch, dtype=np.int32))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(batch_size=batch.shape[0], max_length=batch.shape[1] + NEW_TOKENS,
                              do_sample=False)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(batch)
    while not generator.is_done():
        generator.generate_next_token()
    return [[int(t) for t in generator.get_sequence(i)[batch.shape[1]:]]
            for i in range(batch.shape[0])]


def test_genai_runs_the_artifact_like_mixbuild_from_ids(genai, model, expected):
    og, genai_model = genai
    for prompt, tokens in zip(PROMPTS, expected, strict=True):
        ids = model.tokenizer.encode(prompt)
        assert _genai_greedy(og, genai_model, ids) == [tokens]
        assert model.generate_ids([ids], max_new_tokens=NEW_TOKENS)[0].token_ids == tokens


def test_genai_text_needs_add_special_tokens_for_bos(genai, model, expected):
    """genai's Tokenizer adds no special tokens by default (src/models/model.cpp creates it with
    add_special_tokens=false), so a raw prompt lacks the BOS that tokenizer.json's post
    processor (and mixbuild, and transformers) put first. With add_special_tokens on, genai's
    tokenizer infers BOS from that post processor: the same ids, the same tokens."""
    og, genai_model = genai
    tokenizer = og.Tokenizer(genai_model)
    ours = [model.tokenizer.encode(p) for p in PROMPTS]
    assert ours[0][0] == model.spec.bos_token_id
    assert [[int(t) for t in tokenizer.encode(p)] for p in PROMPTS] == [ids[1:] for ids in ours]
    tokenizer.update_options(add_special_tokens="true")
    assert [[int(t) for t in tokenizer.encode(p)] for p in PROMPTS] == ours
    batch = tokenizer.encode_batch(PROMPTS).as_numpy()   # right-padded with pad_token_id
    assert _genai_greedy(og, genai_model, batch) == expected


def test_genai_chat_template_matches_mixbuild(genai, model):
    """The template writes {{ bos_token }} itself; both encode the rendering without adding
    special tokens (genai's default; mixbuild's encode_chat)."""
    og, genai_model = genai
    tokenizer = og.Tokenizer(genai_model)
    text = tokenizer.apply_chat_template(json.dumps(CHAT), add_generation_prompt=True)
    assert text == model.tokenizer.apply_chat_template(CHAT)
    ids = [int(t) for t in tokenizer.encode(text)]
    assert ids == model.tokenizer.encode_chat(CHAT) and ids[0] == model.spec.bos_token_id
    assert _genai_greedy(og, genai_model, ids) == [
        model.chat(CHAT, max_new_tokens=NEW_TOKENS).token_ids]


def test_optimum_runs_the_artifact_like_mixbuild(artifact, expected):
    pytest.importorskip("optimum.onnxruntime", reason=(
        "Optimum's ORTModelForCausalLM lives in optimum-onnx, whose releases (0.1.0) require "
        "transformers<4.58; mixbuild requires transformers>=5.24"))
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    ort_model = ORTModelForCausalLM.from_pretrained(artifact, use_cache=True, use_io_binding=False)
    # Optimum-ONNX sizes the empty first-step past with num_key_value_heads only for the model
    # types it lists (modeling_decoder.py: mistral, llama, qwen2, ...), not mixtral: it uses
    # num_attention_heads, and ONNX Runtime refuses past_key_values.*.key [B, Nq, 0, D] for
    # the graph's [B, Nkv, past_seq, D]. Correct it for a GQA model.
    ort_model.num_key_value_heads = ort_model.config.num_key_value_heads
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = ort_model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=NEW_TOKENS,
                             do_sample=False)
    assert isinstance(out, torch.Tensor)
    assert out[:, enc["input_ids"].shape[1]:].tolist() == expected
