"""`--lm-head int8 | int4` (int4 artifacts): lm_head becomes a quantized linear in both
layouts, stored as the GPTQ result, run by ONNX Runtime's MatMulNBits (8-bit: mixbuild's own
rewrite, int8 activations), and refused where it cannot apply."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from mixbuild.cli import main
from mixbuild.errors import UsageError
from mixbuild.exporter.export import export_checkpoint
from mixbuild.model.checkpoint import Checkpoint
from mixbuild.plugins import formats
from mixbuild.quant.config import QuantConfig
from mixbuild.runtime.ort_runner import OrtRunner
from mixbuild.runtime.runner import prefill_feeds
from mixbuild.tensors import initializer_array

CALIB = {"calib_tokens": 256, "calib_seq_len": 128}
MADE = (("int8", "serving"), ("int8", "concat"), ("int4", "serving"))
ONNX_TYPE = {"int8": onnx.TensorProto.INT8, "int4": onnx.TensorProto.INT4}


@pytest.fixture(scope="module")
def heads(fixture_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_head")
    return {(kind, layout): export_checkpoint(
        fixture_dir, root / f"{kind}-{layout}", progress=False, layout=layout,
        quant=QuantConfig.parse("int4", lm_head=kind, **CALIB)) for kind, layout in MADE}


def _graph(path):
    return onnx.load(str(path / "model.onnx"), load_external_data=False).graph


@pytest.mark.parametrize("kind, layout", MADE)
def test_lm_head_is_a_quantized_linear(heads, kind, layout, fixture_dir):
    path = heads[kind, layout]
    graph = _graph(path)
    inits = {t.name: t for t in graph.initializer}
    assert "lm_head.weight" not in inits                       # no float copy left
    spec = Checkpoint(fixture_dir).spec
    weight = inits["lm_head.weight.quantized"]
    assert weight.data_type == ONNX_TYPE[kind]
    assert list(weight.dims) == [spec.hidden_size, spec.vocab_size]
    producers = {o: n for n in graph.node for o in n.output}
    dq = next(n for n in graph.node if n.input and n.input[0] == "lm_head.weight.quantized")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
    assert dq.op_type == "DequantizeLinear" and attrs == {"axis": 0, "block_size": 128}
    head = next(n for n in graph.node if dq.output[0] in n.input)
    assert head.op_type == "MatMul" and head.input[1] == dq.output[0]
    if layout == "serving":                                    # the Gemm became this MatMul
        assert producers["logits"] is head
    q = json.loads((path / "mixbuild.json").read_text())["quantization"]
    assert q["lm_head"] == kind and q["linears"] == 4 * spec.num_layers + 1


@pytest.mark.parametrize("kind, bound", [("int8", 0.02), ("int4", 0.3)])
def test_stored_lm_head_is_the_gptq_weight(heads, kind, bound, fixture_dir):
    """Dequantizing what the artifact stores gives the weight whose error the manifest records
    (a transposed or mis-packed store gives an error near 1.4)."""
    path = heads[kind, "serving"]
    inits = {t.name: t for t in _graph(path).initializer}
    stored = torch.from_numpy(initializer_array(inits["lm_head.weight.quantized"], path).copy())
    scale = torch.from_numpy(initializer_array(inits["lm_head.weight.scale"], path).copy()).float()
    codes = (formats.unpack_int4(stored) if kind == "int4" else stored).float()   # [H, V]
    w_dq = codes * scale.repeat_interleave(128, dim=0)[:codes.shape[0]]
    w = Checkpoint(fixture_dir).weight("lm_head").float().T
    error = float((w_dq - w).norm() / w.norm())
    recorded = json.loads((path / "mixbuild.json").read_text())["quantization"]
    assert 0.001 < error < bound
    assert error == pytest.approx(recorded["lm_head_weight_rel_error"], rel=1e-3)


def test_int8_head_runs_as_8bit_matmulnbits_close_to_the_body(heads, tmp_path):
    from tests.runtime.test_ort_quant import optimized

    path = heads["int8", "concat"]
    fast, graph = optimized({}, path, tmp_path)
    nbits = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert sorted(a["bits"] for a in nbits) == [4] * 12 + [8]
    assert {a["accuracy_level"] for a in nbits if a["bits"] == 8} == {4}
    assert fast.kernels["lm_head"].startswith("MatMulNBits int8")
    body = OrtRunner(path, threads=1, fast_quantized=False)
    ids = np.array([[1, 755, 912, 300, 41, 7, 9, 1000, 1001, 17]])
    got = fast.infer(prefill_feeds(fast.spec, ids, np.ones_like(ids)))["logits"]
    want = body.infer(prefill_feeds(body.spec, ids, np.ones_like(ids)))["logits"]
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02   # int8 activations only
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_both_layouts_give_the_same_tokens(heads):
    import mixbuild.runtime as rt

    tokens = {}
    for layout in ("serving", "concat"):
        model = rt.load(heads["int8", layout], threads=1)
        ids = model.tokenizer.encode("def fibonacci(n):\n")
        tokens[layout] = model.generate_ids([ids], max_new_tokens=16, ignore_eos=True)[0].token_ids
        assert model.step.runner.kernels["lm_head"].startswith("MatMulNBits int8")
        model.close()
    assert tokens["serving"] == tokens["concat"]
    model = rt.load(heads["int4", "serving"], threads=1)
    assert model.step.runner.kernels["lm_head"] == "MatMulNBits int4 (accuracy_level 1)"
    model.close()


def test_the_option_is_refused_where_it_cannot_apply(fixture_dir, tmp_path):
    with pytest.raises(UsageError, match="int4 option"):
        QuantConfig.parse("fp8", lm_head="int8")
    with pytest.raises(UsageError, match="lm_head quantization"):
        QuantConfig.parse("int4", lm_head="int2")
    for args, message in ((("--precision", "fp8"), "--lm-head has no effect"),
                          (("--precision", "float"), "--lm-head has no effect"),
                          (("--precision", "int4", "--format", "hf"), "option of the ONNX artifact")):
        out = tmp_path / "out"
        result = CliRunner().invoke(main, ["export", str(fixture_dir), "-o", str(out),
                                           "--lm-head", "int8", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and not out.exists()
