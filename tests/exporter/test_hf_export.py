"""`mixbuild export --format hf | hf-modelopt`: quantized Hugging Face checkpoints that the real
libraries load (transformers + compressed-tensors), holding the same calibration as the ONNX
artifact, and the refusals of bad input.

Every export here uses one small calibration (64 tokens in sequences of 32, no GPTQ) on the
trained fixture; calibration is deterministic, so an ONNX artifact and an HF checkpoint exported
with the same QuantConfig hold the same tensors (checked bit for bit below).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mixbuild.cli import main
from mixbuild.contract import HF_INDEX_FILE, HF_MANIFEST_FILE, HF_MODELOPT_CONFIG_FILE
from mixbuild.errors import CheckpointError
from mixbuild.exporter.export import export_checkpoint
from mixbuild.plugins import formats
from mixbuild.quant.config import QuantConfig
from mixbuild.runtime.ort_runner import OrtRunner
from mixbuild.runtime.runner import prefill_feeds
from mixbuild.schemes.int4 import pack_int32, unpack_int32
from tests.conftest import small_quant

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is in the dev extra")

def _quant(precision: str, **kw) -> QuantConfig:
    return small_quant(precision, **kw)


@pytest.fixture(scope="module")
def exports(fixture_dir, fixture_export, tmp_path_factory):
    """{precision: (hf checkpoint dir, onnx artifact dir)} from the same QuantConfig, plus the
    ModelOpt fp8 checkpoint (per-tensor weight scales)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for precision in ("fp8", "int4"):
        q = _quant(precision)
        out[precision] = (export_checkpoint(fixture_dir, root / f"{precision}-hf", quant=q,
                                            format="hf", progress=False),
                          fixture_export(quant=q, layout="concat"))
    out["modelopt"] = export_checkpoint(fixture_dir, root / "fp8-modelopt",
                                        quant=_quant("fp8", fp8_per_channel=False),
                                        format="hf-modelopt", progress=False)
    return out


def _ids(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(3, vocab, size=(2, 24), dtype=np.int64)


def _onnx_logits(artifact: Path, ids: np.ndarray) -> np.ndarray:
    runner = OrtRunner(artifact)
    return runner.infer(prefill_feeds(runner.spec, ids, np.ones_like(ids)))["logits"]


def _transformers_logits(checkpoint: Path, ids: np.ndarray) -> tuple[np.ndarray, object]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy(), model


def _onnx_initializers(artifact: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(artifact / "model.onnx"), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ------------------------------------------------------------------------------ the layout

def test_pack_int32_is_compressed_tensors_pack_to_int32():
    """Our packing against the library's own pack_to_int32 / unpack_from_int32 (num_bits=4)."""
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )

    codes = torch.randint(-8, 8, (6, 64), generator=torch.Generator().manual_seed(1)).to(torch.int8)
    ours = pack_int32(codes)
    assert ours.dtype == torch.int32 and ours.shape == (6, 8)
    assert torch.equal(ours, pack_to_int32(codes, 4))
    assert torch.equal(unpack_from_int32(ours, 4, torch.Size([6, 64])), codes)
    assert torch.equal(unpack_int32(ours, 64), codes)
    # first value in the lowest bits: codes [-8, -7, ...] -> nibbles 0, 1, ... from bit 0
    assert int(pack_int32(torch.arange(-8, 0, dtype=torch.int8)[None])[0, 0]) == 0x76543210


@pytest.mark.parametrize("precision", ["fp8", "int4"])
def test_config_is_valid_compressed_tensors(exports, precision):
    from compressed_tensors.quantization import QuantizationConfig

    hf, _ = exports[precision]
    config = json.loads((hf / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    group = qc.config_groups["group_0"]
    assert qc.quant_method == "compressed-tensors" and qc.quantization_status == "compressed"
    assert "lm_head" in qc.ignore and "model.layers.0.block_sparse_moe.gate" in qc.ignore
    if precision == "fp8":
        assert qc.format == "float-quantized"
        assert (group.weights.type, group.weights.num_bits, group.weights.strategy) == (
            "float", 8, "channel")
        assert group.input_activations.dynamic is False
        assert group.input_activations.strategy == "tensor"
    else:
        assert qc.format == "pack-quantized"
        assert (group.weights.type, group.weights.num_bits, group.weights.group_size,
                group.weights.symmetric) == ("int", 4, 128, True)
        assert group.input_activations is None
    for name in ("model.safetensors.index.json", "tokenizer.json", "generation_config.json",
                 HF_MANIFEST_FILE):
        assert (hf / name).is_file(), name
    manifest = json.loads((hf / HF_MANIFEST_FILE).read_text())
    assert manifest["quantization"]["calib_tokens"] == 64
    assert len(manifest["quantization"]["layers"]) == 3


@pytest.mark.parametrize("precision", ["fp8", "int4"])
def test_same_tensors_as_the_onnx_artifact(exports, precision):
    """The checkpoint's quantized attention weights and scales are the ONNX artifact's, bit for
    bit (the same QuantStore tensors)."""
    from safetensors import safe_open

    hf, artifact = exports[precision]
    index = json.loads((hf / HF_INDEX_FILE).read_text())["weight_map"]
    init = _onnx_initializers(artifact)

    def read(name):
        with safe_open(str(hf / index[name]), "pt") as fh:
            return fh.get_tensor(name)

    for layer in range(3):
        for proj in ("q", "k", "v", "o"):
            src = f"layers.{layer}.attn.{proj}_proj.weight"
            dst = f"model.layers.{layer}.self_attn.{proj}_proj"
            scale = init[f"{src}.scale"]
            if precision == "fp8":
                w = read(dst + ".weight")
                assert w.dtype == torch.float8_e4m3fn
                onnx_bits = np.asarray(init[f"{src}.quantized"]).view(np.uint8).T
                assert np.array_equal(w.view(torch.uint8).numpy(), onnx_bits)
                assert np.array_equal(read(dst + ".weight_scale").numpy()[:, 0], scale)
                amax_scale = float(init[f"{src}.input_scale"])
                assert read(dst + ".input_scale").shape == (1,)
                assert float(read(dst + ".input_scale")[0]) == pytest.approx(amax_scale, rel=1e-6)
            else:
                codes = unpack_int32(read(dst + ".weight_packed"), 128).numpy()
                assert np.array_equal(codes.T, np.asarray(init[f"{src}.quantized"]).astype(np.int8))
                assert np.array_equal(read(dst + ".weight_scale").numpy(), scale.T)
                assert read(dst + ".weight_shape").tolist() == list(codes.shape)


def test_int4_transformers_logits_match_the_onnx_artifact(exports):
    """transformers + compressed-tensors (real pack-quantized decompression) against mixbuild's
    int4 ONNX artifact on ONNX Runtime: the same dequantized weights, fp32 both sides, so only
    float32 summation order differs; 1e-4 absolute on logits of magnitude ~15 (measured 1e-5)."""
    hf, artifact = exports["int4"]
    ids = _ids(2048)
    hf_logits, _ = _transformers_logits(hf, ids)
    np.testing.assert_allclose(hf_logits, _onnx_logits(artifact, ids), atol=1e-4, rtol=0)


def test_fp8_transformers_logits_match_mixbuild(exports):
    """fp8: transformers 5.24 + compressed-tensors applies the static input scales of the
    attention projections but dequantizes the fused experts at load (W8A16 experts: no expert
    activation quantization on its CPU path). So the chain is checked in two tight steps:
    transformers == mixbuild's loader with the same W8A16 experts, and mixbuild's loader with
    W8A8 experts (what vLLM's fused-MoE and the ONNX body compute) == the ONNX artifact.

    Each step compares the fp8 activation codes first (equal, but for flips where float32
    summation order puts the two sides on either side of a rounding boundary: tests/fp8_codes.py
    says why and how they are bounded), then runs mixbuild's loader on the other side's codes
    and compares logits to 1e-4 (measured 5e-6 and 8e-6): with the codes equal, only float32
    summation order differs, on any CPU."""
    from mixbuild.runtime.hf_quantized import load_runner
    from tests.fp8_codes import record_onnx, recording_compressed_tensors, run_replayed

    hf, artifact = exports["fp8"]
    ids = _ids(2048)
    with recording_compressed_tensors() as transformers_codes:
        hf_logits, model = _transformers_logits(hf, ids)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert getattr(q_proj, "quantization_scheme", None) is not None   # W8A8 through the library
    assert tuple(q_proj.input_scale.shape) == (1,)
    assert len(transformers_codes) == 3 * 4                           # q, k, v, o in 3 layers
    feeds = prefill_feeds(load_runner(hf).spec, ids, np.ones_like(ids))
    w8a16 = load_runner(hf, fp8_expert_inputs=False)
    np.testing.assert_allclose(hf_logits, run_replayed(lambda: w8a16.infer(feeds)["logits"],
                                                       transformers_codes), atol=1e-4, rtol=0)
    onnx_out, onnx_codes = record_onnx(artifact, feeds)
    w8a8 = load_runner(hf)
    np.testing.assert_allclose(run_replayed(lambda: w8a8.infer(feeds)["logits"], onnx_codes),
                               onnx_out["logits"], atol=1e-4, rtol=0)


def test_int4_loader_matches_the_onnx_artifact(exports):
    from mixbuild.runtime.hf_quantized import load_runner

    hf, artifact = exports["int4"]
    ids = _ids(2048)
    runner = load_runner(hf, debug=True)
    out = runner.infer(prefill_feeds(runner.spec, ids, np.ones_like(ids)))
    np.testing.assert_allclose(out["logits"], _onnx_logits(artifact, ids), atol=1e-4, rtol=0)
    assert len(out) > 1 + 2 * 3    # the debug outputs the validator reads


def test_modelopt_tensors_and_config(exports):
    """NVIDIA's unified format as vLLM's ModelOptFp8Config / ModelOptFp8LinearMethod and
    TensorRT-LLM read it: hf_quant_config.json with quant_algo FP8 and exclude_modules, float8
    weights, float32 scalar weight_scale / input_scale on every attention projection and expert."""
    from safetensors import safe_open

    hf = exports["modelopt"]
    legacy = json.loads((hf / HF_MODELOPT_CONFIG_FILE).read_text())
    assert legacy["quantization"]["quant_algo"] == "FP8"
    assert legacy["quantization"]["kv_cache_quant_algo"] is None
    assert "lm_head" in legacy["quantization"]["exclude_modules"]
    inline = json.loads((hf / "config.json").read_text())["quantization_config"]
    assert inline["quant_method"] == "modelopt" and inline["quant_algo"] == "FP8"
    index = json.loads((hf / HF_INDEX_FILE).read_text())["weight_map"]
    names = [n for n in index if n.endswith(".weight_scale")]
    assert len(names) == 3 * (4 + 8 * 3)
    for scale_name in names:
        prefix = scale_name.removesuffix(".weight_scale")
        with safe_open(str(hf / index[scale_name]), "pt") as fh:
            w, s, a = (fh.get_tensor(prefix + suffix)
                       for suffix in (".weight", ".weight_scale", ".input_scale"))
        assert w.dtype == torch.float8_e4m3fn and w.dim() == 2
        assert s.dtype == a.dtype == torch.float32 and s.shape == a.shape == ()
        assert float(s) > 0 and float(a) > 0
        assert float(w.float().abs().max()) <= formats.FP8_MAX
    gates = [n for n in index if n.endswith("block_sparse_moe.gate.weight")]
    assert len(gates) == 3 and not any(n.startswith("lm_head.weight_") for n in index)


# ------------------------------------------------------------------------------- bad input

def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("args, message", [
    (["--precision", "float", "--format", "hf"], "writes a quantized Hugging Face checkpoint"),
    (["--precision", "int4", "--format", "hf-modelopt"], "unified FP8 format only"),
    (["--precision", "fp8", "--format", "hf-modelopt"], "needs per-tensor fp8 weight scales"),
    (["--precision", "fp8", "--format", "hf", "--debug-outputs"], "option of the ONNX artifact"),
])
def test_refused_options(fixture_dir, tmp_path, args, message):
    out = tmp_path / "out"
    result = _cli("export", fixture_dir, "-o", out, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_refused_and_overwrite_only_replaces_mixbuild_output(exports, fixture_dir,
                                                                             tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _cli("export", fixture_dir, "-o", out, "--precision", "fp8", "--format", "hf")
    assert result.exit_code == 2 and "already exists" in result.output
    result = _cli("export", fixture_dir, "-o", out, "--precision", "fp8", "--format", "hf",
                  "--overwrite")
    assert result.exit_code == 2 and "not a mixbuild hf-checkpoint" in result.output
    # an ONNX artifact is a mixbuild output, but not of this kind
    result = _cli("export", fixture_dir, "-o", exports["fp8"][1], "--precision", "fp8",
                  "--format", "hf", "--overwrite")
    assert result.exit_code == 2 and "a mixbuild artifact" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_an_hf_checkpoint(exports, fixture_dir, tmp_path):
    import shutil

    out = tmp_path / "ck"
    shutil.copytree(exports["fp8"][0], out)
    export_checkpoint(fixture_dir, out, quant=_quant("int4"), format="hf", overwrite=True,
                      progress=False)
    assert json.loads((out / HF_MANIFEST_FILE).read_text())["precision"] == "int4"
    assert json.loads((out / HF_MANIFEST_FILE).read_text())["kind"] == "hf-checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]   # no leftovers


def test_corrupt_checkpoint_refused_nothing_written(fixture_dir, tmp_path):
    """A NaN in the source weights (it would give NaN scales): refused with exit 2 and the
    tensor's name, nothing written (no output, no hidden sibling left)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(fixture_dir, src)
    tensors = load_file(str(src / "model.safetensors"))
    name = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "work" / "out"
    result = _cli("export", src, "-o", out, "--precision", "int4", "--format", "hf",
                  "--calib-tokens", "256")
    assert result.exit_code == 2, result.output
    assert name in result.output and "NaN" in result.output
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_damaged_scale_refused_by_the_loader(exports, tmp_path):
    """A scale changed after export: the loader refuses it (sha256), and with the hash check off
    still refuses a non-finite scale by name."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mixbuild.runtime.hf_quantized import load_runner

    hf = tmp_path / "damaged"
    shutil.copytree(exports["int4"][0], hf)
    index = json.loads((hf / HF_INDEX_FILE).read_text())["weight_map"]
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight_scale"
    tensors = load_file(str(hf / index[name]))
    tensors[name][0, 0] = float("inf")
    save_file(tensors, str(hf / index[name]), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_runner(hf)
    with pytest.raises(CheckpointError, match=f"invalid quantization scale {name}"):
        load_runner(hf, verify=False)


@pytest.mark.parametrize("precision", ["fp8", "int4"])
def test_validate_takes_the_hf_checkpoint_and_agrees_with_its_onnx_twin(exports, fixture_dir,
                                                                      precision, tmp_path):
    """`mixbuild validate HF_CHECKPOINT` runs it through the torch backend with the engines'
    dequantization and gives the full report; on the same calibration its numbers are the
    ONNX artifact's (the same dequantized weights, float32 on both sides)."""
    hf, onnx_dir = exports[precision]
    reports = {}
    for name, path in (("hf", hf), ("onnx", onnx_dir)):
        out = tmp_path / name
        result = CliRunner().invoke(main, ["validate", str(path), "--reference", str(fixture_dir),
                                           "-o", str(out), "--max-sequences", "4",
                                           "--max-tokens", "64", "--steps", "4", "--no-plot"])
        assert result.exit_code in (0, 1), result.output
        reports[name] = json.loads((out / "report.json").read_text())
    hf_report, onnx_report = reports["hf"], reports["onnx"]
    assert hf_report["precision"] == onnx_report["precision"] == precision
    a, b = hf_report["metrics"], onnx_report["metrics"]
    assert a["top1_agreement"] == b["top1_agreement"]
    assert abs(a["kl_mean"] - b["kl_mean"]) < 1e-4 * max(1.0, b["kl_mean"] * 100)
    layers = hf_report["layers"]
    assert len(layers) == 3 and all(layer["router_flip_rate"] is not None for layer in layers)
    assert all(any(e is not None for e in layer["expert_rel_error"]) for layer in layers), \
        "no per-expert errors in the report"


def test_validate_refuses_a_damaged_hf_checkpoint(exports, fixture_dir, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(exports["int4"][0], damaged)
    shard = sorted(damaged.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["validate", str(damaged), "--reference", str(fixture_dir),
                                       "-o", str(tmp_path / "r")])
    assert result.exit_code == 2 and "sha256" in result.output, result.output


@pytest.mark.parametrize("precision", ["fp8", "int4"])
def test_run_and_inspect_open_the_hf_checkpoint(exports, precision):
    """`mixbuild run` and `inspect` open a `--format hf` export like any model directory (the
    plain checkpoint reader refuses float8 and packed int4 tensors: one opener sends it to
    mixbuild's quantized-checkpoint loader)."""
    hf, _ = exports[precision]
    result = CliRunner().invoke(main, ["run", str(hf), "--prompt", "def f(x):",
                                       "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "[torch] " in result.output and "3 generated tokens" in result.output
    shown = CliRunner().invoke(main, ["inspect", str(hf), "--json"])
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.output)
    assert (report["kind"], report["precision"], report["hashes"]) == (
        "quantized checkpoint", precision, "ok")
    assert report["spec"]["num_layers"] == 3
