"""FP8 and INT4 artifacts of the trained fixture: accuracy, layouts, sizes, calibration records."""

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mixbuild.errors import CheckpointError, UsageError
from mixbuild.exporter.export import export_checkpoint
from mixbuild.quant import awq
from mixbuild.quant.config import QuantConfig
from mixbuild.validate.run import validate_artifact

README = Path(__file__).resolve().parents[2] / "README.md"
_CLAIM = re.compile(r"top-1 (?P<top1>\d\.\d+)(?: \((?P<hits>\d+)/(?P<n>\d+), 95% interval "
                    r"(?P<low>\d\.\d+)-(?P<high>\d\.\d+)\))?, KL (?P<kl>\d\.\d+), "
                    r"ppl (?P<ppl>[+-]?\d+\.\d+)%")


@pytest.fixture(scope="session")
def quantized(shipped):
    """The README's measured rows come from `mixbuild export FIXTURE --precision fp8|int4` with
    the CLI's defaults (--calib-tokens 4096, sequences of 256, the built-in text, the serving
    layout): the session's shipped artifacts (tests/conftest.py)."""
    return shipped


@pytest.fixture(scope="session")
def reports(quantized, fixture_dir):
    return {p: validate_artifact(path, fixture_dir, progress=False)[0] for p, path in quantized.items()}


def readme_claim(precision: str) -> dict[str, str]:
    """The README's "Measured" row for `precision` vs transformers on the fixture, as strings."""
    rows = [line for line in README.read_text(encoding="utf-8").splitlines()
            if line.startswith(f"| {precision} (") and "vs transformers, fixture" in line]
    if len(rows) != 1:
        pytest.fail(f"README.md should have one '| {precision} (...) vs transformers, fixture' row "
                    f"in its Measured table, found {len(rows)}: update the README and this test")
    found = _CLAIM.search(rows[0])
    if found is None:
        pytest.fail(f"README.md's {precision} row no longer reads 'top-1 X[ (H/N, 95% interval "
                    f"L-U)], KL K, ppl P%': {rows[0]!r}")
    return found.groupdict()


def assert_matches_readme(precision: str, m) -> None:
    """top-1 inside the README's 95% interval (its Wilson interval at the measured positions when
    the README gives none); KL and perplexity change within one unit of the README's last digit."""
    from mixbuild.validate.metrics import wilson_interval

    claim = readme_claim(precision)
    top1 = float(claim["top1"])
    if claim["n"] is not None:
        hits, n = int(claim["hits"]), int(claim["n"])
        low, high = float(claim["low"]), float(claim["high"])
        assert m.positions == n, f"validate scored {m.positions} positions, the README {n}"
        assert round(hits / n, len(claim["top1"]) - 2) == top1          # the README's own row
        assert [round(x, 3) for x in wilson_interval(hits, n)] == [low, high]
    else:
        low, high = wilson_interval(round(top1 * m.positions), m.positions)
    assert low <= m.top1_agreement <= high, (
        f"{precision} top-1 {m.top1_agreement:.4f} is outside [{low:.4f}, {high:.4f}], the 95% "
        f"interval of README.md's top-1 {claim['top1']}")

    def unit(text: str) -> float:
        return 10.0 ** -len(text.split(".")[1])

    kl, ppl = float(claim["kl"]), float(claim["ppl"])
    assert abs(m.kl_mean - kl) <= unit(claim["kl"]) + 1e-12, \
        f"{precision} KL {m.kl_mean:.5f}, README.md says {claim['kl']}"
    assert abs(100 * m.ppl_rel_delta - ppl) <= unit(claim["ppl"]) + 1e-12, \
        f"{precision} ppl {100 * m.ppl_rel_delta:+.3f}%, README.md says {claim['ppl']}%"


def test_fp8_accuracy_on_trained_fixture(reports):
    m = reports["fp8"].metrics
    # README.md: top-1 0.9697 (993/1024, 95% interval 0.957-0.979), KL 0.0046, ppl -0.14%
    # (under the 0.97 target: at 1024 positions rates 0.01 apart cannot be told apart)
    assert_matches_readme("fp8", m)
    assert len(reports["fp8"].layers) == 3
    assert all(0.0 <= layer.router_flip_rate <= 1.0 for layer in reports["fp8"].layers)


def test_int4_accuracy_on_trained_fixture(reports):
    m = reports["int4"].metrics
    assert_matches_readme("int4", m)   # README.md: top-1 0.930, KL 0.021, ppl +1.0%
    assert all(layer.router_flip_rate is not None for layer in reports["int4"].layers)


def test_quantized_graphs_and_layouts(quantized):
    spec = json.loads((quantized["fp8"] / "mixbuild.json").read_text())["spec"]
    e, h, i = spec["num_experts"], spec["hidden_size"], spec["intermediate_size"]
    for precision, path in quantized.items():
        onnx.checker.check_model(str(path / "model.onnx"), full_check=True)
        model = onnx.load(str(path / "model.onnx"), load_external_data=False)
        init = {t.name: t for t in model.graph.initializer}
        gate_up = init["layers.0.moe.w_gate_up.quantized"]
        q = init["layers.1.attn.q_proj.weight.quantized"]
        if precision == "fp8":
            assert gate_up.data_type == onnx.TensorProto.FLOAT8E4M3FN and list(gate_up.dims) == [e, 2 * i, h]
            assert q.data_type == onnx.TensorProto.FLOAT8E4M3FN
            assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 4 * spec["num_layers"]
        else:
            assert gate_up.data_type == onnx.TensorProto.INT4 and list(gate_up.dims) == [e, 2 * i, h]
            assert q.data_type == onnx.TensorProto.INT4
            assert list(q.dims) == [h, spec["num_heads"] * spec["head_dim"]]
            dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
            assert all(onnx.helper.get_attribute_value(a) == 128 for n in dq for a in n.attribute
                       if a.name == "block_size")
        assert "layers.0.moe.w_gate_up" not in init and "lm_head.weight" in init
        experts = [n for n in model.graph.node if n.op_type == "MoEExperts"]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in experts[0].attribute}
        assert attrs["quantization"] == precision.encode()
        assert len(experts[0].input) == (9 if precision == "fp8" else 7)


def _expert_bytes(path):
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    sizes = {}
    for t in model.graph.initializer:
        info = {e.key: int(e.value) for e in t.external_data if e.key == "length"}
        sizes[t.name] = info.get("length", len(t.raw_data))
    return sizes


def test_bytes_per_parameter(quantized, fixture_dir):
    from mixbuild.model.spec import MixtralSpec

    spec = MixtralSpec.from_file(fixture_dir / "config.json")
    expert_params = spec.num_layers * spec.num_experts * 3 * spec.hidden_size * spec.intermediate_size
    for precision, per_param in (("fp8", 1.0), ("int4", 0.5)):
        sizes = _expert_bytes(quantized[precision])
        weights = sum(v for k, v in sizes.items() if ".moe.w_" in k and k.endswith(".quantized"))
        scales = sum(v for k, v in sizes.items() if ".moe.w_" in k and k.endswith(".scale"))
        assert weights == expert_params * per_param
        assert scales < 0.05 * weights


def test_manifest_records_calibration(quantized, fixture_dir):
    from mixbuild.model.spec import MixtralSpec

    spec = MixtralSpec.from_file(fixture_dir / "config.json")
    manifest = json.loads((quantized["int4"] / "mixbuild.json").read_text())
    quant = manifest["quantization"]
    assert quant["precision"] == "int4" and quant["int4_method"] == "awq" and quant["group_size"] == 128
    assert len(quant["layers"]) == spec.num_layers
    for layer in quant["layers"]:
        assert sum(layer["routed_tokens"]) == QuantConfig.calib_tokens * spec.top_k   # the default
        assert len(layer["expert_rel_error"]["down"]) == spec.num_experts
        assert set(layer["awq_alpha"]) >= {"attn", "moe", "down"}
    assert (quantized["int4"] / "expert_load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (quantized["int4"] / "smoothing.safetensors").is_file()


def test_awq_never_worse_than_rtn_and_helps_outliers():
    torch.manual_seed(0)
    x = torch.randn(512, 256)
    x[:, :4] *= 30.0                       # a few outlier input channels, as in real LLMs
    w = torch.randn(64, 256) * 0.05
    quantize = awq.int4_fake_quant(128)
    rtn = float(((x @ quantize(w).T) - x @ w.T).pow(2).mean())
    s, alpha = awq.search_scales(x, [w], quantize, grid=20)
    smoothed = float((((x / s) @ quantize(w * s).T) - x @ w.T).pow(2).mean())
    assert alpha > 0 and smoothed < 0.8 * rtn


def test_smoothing_folds_exactly(fixture_dir):
    """Folded AWQ scales leave the float model unchanged (before rounding)."""
    from mixbuild.model.checkpoint import Checkpoint
    from mixbuild.quant.calibrate import LayerCalibration, load_layer
    from mixbuild.quant.rewrite import SmoothedWeights

    ckpt = Checkpoint(fixture_dir)
    spec = ckpt.spec
    gen = torch.Generator().manual_seed(0)
    smooth = {"attn": torch.rand(spec.hidden_size, generator=gen) + 0.5,
              "moe": torch.rand(spec.hidden_size, generator=gen) + 0.5,
              "down": torch.rand(spec.num_experts, spec.intermediate_size, generator=gen) + 0.5}
    calib = [LayerCalibration([0], {}, [], smooth=smooth if i == 0 else {}) for i in range(spec.num_layers)]
    folded = SmoothedWeights(ckpt, calib)
    layer = load_layer(ckpt, 0)
    x = torch.randn(1, 5, spec.hidden_size, generator=gen)
    ref = layer.moe(layer.post_norm(x))[0]
    with torch.no_grad():
        for name, param in layer.named_parameters():
            param.copy_(folded(f"layers.0.{name}"))
    got = layer.moe(layer.post_norm(x))[0]
    assert torch.allclose(ref, got, atol=1e-5)


def test_quantized_moe_body_matches_formats_reference():
    """The int4 and fp8 MoEExperts bodies dequantize exactly like mixbuild.plugins.formats."""
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    from mixbuild.exporter.functions import experts_function
    from mixbuild.exporter.quant_functions import QuantizedWeights
    from mixbuild.plugins import formats
    from mixbuild.quant.config import QuantConfig
    from mixbuild.schemes import FP8, INT4

    t, h, i, e, k = 9, 128, 64, 4, 2
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(t, h, generator=gen)
    w_gate_up = torch.randn(e, 2 * i, h, generator=gen) * 0.1
    w_down = torch.randn(e, h, i, generator=gen) * 0.1
    weights = torch.softmax(torch.randn(t, k, generator=gen), -1)
    ids = torch.randint(0, e, (t, k), generator=gen, dtype=torch.int32)
    gq, gs = formats.quantize_int4(w_gate_up, 32)
    dq_, ds = formats.quantize_int4(w_down, 32)
    expected = formats.experts_reference_quant(x, weights, ids, gq, dq_, scheme="int4", w_gate_up_scale=gs,
                                               w_down_scale=ds, group_size=32)
    feeds = {"x": x.numpy(), "w": weights.numpy(), "ids": ids.numpy()}
    kinds = {"x": TP.FLOAT, "w": TP.FLOAT, "ids": TP.INT32}
    packed = [helper.make_tensor(n, TP.INT4, [e, *v.shape[1:-1], 2 * v.shape[-1]], v.numpy().tobytes(),
                                 raw=True) for n, v in (("gq", gq), ("dq", dq_))]
    scales = [numpy_helper.from_array(v.numpy(), n) for n, v in (("gs", gs), ("ds", ds))]
    node = helper.make_node("MoEExperts", ["x", "w", "ids", "gq", "dq", "gs", "ds"], ["y"],
                            domain="mixbuild", quantization="int4", group_size=32)
    inputs = [helper.make_tensor_value_info(n, kinds[n], list(a.shape)) for n, a in feeds.items()]
    model = helper.make_model(
        helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TP.FLOAT, [t, h])],
                          packed + scales),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("mixbuild", 1)],
        functions=[experts_function(
            e, QuantizedWeights(INT4, QuantConfig.parse("int4", group_size=32), h, i))])
    got = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    assert np.abs(got - expected.numpy()).max() < 1e-4

    fq, fs = formats.quantize_fp8(w_gate_up, per_channel=True)
    fdq, fds = formats.quantize_fp8(w_down, per_channel=True)
    act = formats.fp8_activation_scale(x)
    real_gate_up = formats.dequantize_fp8(fq, fs)
    swiglu = [torch.nn.functional.silu(g) * u for g, u in
              ((x @ real_gate_up[j].T).chunk(2, -1) for j in range(e))]
    down_scale = torch.cat([formats.fp8_activation_scale(a) for a in swiglu])
    init = [numpy_helper.from_array(v, n) for n, v in (
        ("gs", fs.numpy()), ("ds", fds.numpy()), ("ag", np.full(e, float(act), np.float32)),
        ("ad", down_scale.numpy()))]
    init += [helper.make_tensor(n, TP.FLOAT8E4M3FN, list(v.shape), v.view(torch.uint8).numpy().tobytes(),
                                raw=True) for n, v in (("gq", fq), ("dq", fdq))]
    node = helper.make_node("MoEExperts", ["x", "w", "ids", "gq", "dq", "gs", "ds", "ag", "ad"], ["y"],
                            domain="mixbuild", quantization="fp8")
    inputs = [helper.make_tensor_value_info(n, kinds[n], list(feeds[n].shape)) for n in ("x", "w", "ids")]
    model = helper.make_model(
        helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TP.FLOAT, [t, h])], init),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("mixbuild", 1)],
        functions=[experts_function(e, QuantizedWeights(FP8, QuantConfig.parse("fp8"), h, i))])
    session = ort.InferenceSession(model.SerializeToString())
    got = session.run(None, {n: feeds[n] for n in ("x", "w", "ids")})[0]
    expected = formats.experts_reference_quant(x, weights, ids, fq, fdq, scheme="fp8", w_gate_up_scale=fs,
                                               w_down_scale=fds, act_scale_gate_up=act)
    # the reference does not round the SwiGLU output to e4m3 (relative step 2^-4 per element)
    assert np.abs(got - expected.numpy()).max() < 3e-2 * float(expected.abs().max())


def test_bad_quant_options(fixture_dir, tmp_path, hf_checkpoints):
    with pytest.raises(UsageError, match="unknown precision"):
        QuantConfig.parse("int8")
    with pytest.raises(UsageError, match="group-size"):
        QuantConfig.parse("int4", group_size=0)
    with pytest.raises(UsageError, match="calibration file not found"):
        QuantConfig.parse("fp8", calib_file=tmp_path / "missing.txt")
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    with pytest.raises(UsageError, match="calibration text is too short"):
        export_checkpoint(fixture_dir, tmp_path / "out", quant=QuantConfig.parse("fp8", calib_file=short),
                          progress=False)
    with pytest.raises(CheckpointError, match="tokenizer"):
        export_checkpoint(hf_checkpoints["tiny"], tmp_path / "out2", quant=QuantConfig.parse("fp8"),
                          progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_fp8_error_budget_emulation_reproduces_onnx_runtime(fixture_export, fixture_dir, monkeypatch):
    """benchmarks/fp8_error_budget.py attributes the fp8 error to its quantizers with a torch
    re-run of the artifact's own weights and scales; that re-run must be the artifact's numbers
    (all-position logits: a concat artifact; any calibration: the small one)."""
    import importlib.util
    import sys
    from pathlib import Path

    from mixbuild.runtime.ort_runner import OrtRunner
    from mixbuild.runtime.runner import prefill_feeds
    from mixbuild.validate.data import evaluation_batches
    from tests.conftest import small_quant

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fp8_error_budget.py"
    spec_ = importlib.util.spec_from_file_location("fp8_error_budget", path)
    budget = importlib.util.module_from_spec(spec_)
    monkeypatch.setitem(sys.modules, "fp8_error_budget", budget)  # dataclasses look it up there
    spec_.loader.exec_module(budget)
    artifact = fixture_export(quant=small_quant("fp8"), layout="concat")
    emulation = budget.Fp8Emulation(artifact, fixture_dir)
    batch = evaluation_batches(fixture_dir / "tokenizer.json", max_tokens=128, batch_size=4,
                               bos_id=1, max_sequences=4)[0]
    runner = OrtRunner(artifact)
    ort = runner.infer(prefill_feeds(runner.spec, batch.input_ids, batch.attention_mask))["logits"]
    full = budget.torch_logits(emulation.model(budget.ROWS[0]), batch)
    diff = np.abs(full - ort).max(axis=-1)
    assert np.median(diff) < 1e-4
    assert (full.argmax(-1) == ort.argmax(-1)).mean() >= 0.99
    # with every quantizer off it is the float reference; weights alone already change the logits
    off = budget.torch_logits(emulation.model(budget.Row("none", False, ())), batch)
    reference = budget.torch_logits(emulation.reference, batch)
    weights_only = budget.torch_logits(emulation.model(budget.Row("w", True, ())), batch)
    assert np.array_equal(off, reference)
    assert np.abs(weights_only - reference).max() > 1e-2


@pytest.mark.parametrize("propagate", [True, False])
def test_int4_calibrates_each_layer_on_what_the_quantized_layers_compute(fixture_dir, tmp_path,
                                                                          monkeypatch, propagate):
    """With propagation (int4's default) layer i + 1 is calibrated on the hidden states the
    quantized artifact itself computes for layer i; without it, on the float layer's (which
    differ from the artifact's by the quantization error)."""
    import mixbuild.quant.calibrate as C
    from mixbuild.contract import Debug
    from mixbuild.model.checkpoint import Checkpoint
    from mixbuild.runtime.ort_runner import OrtRunner
    from mixbuild.runtime.runner import prefill_feeds

    seen = []
    original = C._calibrate_layer

    def spy(layer, x, *rest):
        seen.append(x.clone())
        return original(layer, x, *rest)

    monkeypatch.setattr(C, "_calibrate_layer", spy)
    quant = QuantConfig.parse("int4", calib_tokens=64, calib_seq_len=32, propagate=propagate)
    artifact = export_checkpoint(fixture_dir, tmp_path / "a", quant=quant, debug_outputs=True,
                                 layout="concat", progress=False)
    assert json.loads((artifact / "mixbuild.json").read_text())["quantization"]["inputs"] == (
        "quantized layers" if propagate else "float layers")
    tokens = C.calibration_tokens(Checkpoint(fixture_dir), quant).numpy()
    runner = OrtRunner(artifact, threads=1, fast_quantized=False)
    out = runner.infer(prefill_feeds(runner.spec, tokens, np.ones_like(tokens)))
    for layer in (1, 2):
        want = out[Debug.HIDDEN.name_for(layer - 1)]
        error = np.linalg.norm(seen[layer].numpy() - want) / np.linalg.norm(want)
        assert (error < 1e-4) if propagate else (error > 1e-3), (layer, error)
