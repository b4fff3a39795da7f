"""`mixbuild validate` on what users ship: default fp8 / int4 exports (no --debug-outputs) get
full per-layer and per-expert reports and pass; damaged copies fail and are located; the
shipped files are never changed; several artifacts in one run equal their single runs;
serving-layout artifacts and long inputs are validated too."""

import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from mixbuild.cli import main
from mixbuild.exporter.artifact import Artifact
from mixbuild.exporter.export import export_checkpoint
from mixbuild.runtime.ort_runner import OrtRunner
from mixbuild.validate.diagnostics import ALL_LOGITS, expose
from mixbuild.validate.run import validate_artifact, validate_artifacts
from tests.validate.conftest import write_char_tokenizer
from tests.validate.damage import scale_expert, shuffle_group_scales, zero_attention

QUICK = {"max_sequences": 4, "steps": 4, "progress": False, "plot": False}


@pytest.fixture(scope="session")
def single_reports(shipped, fixture_dir):
    return {p: validate_artifact(path, fixture_dir, progress=False)[0] for p, path in shipped.items()}


def digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("precision", ["fp8", "int4"])
def test_default_exports_pass_with_full_diagnostics(shipped, single_reports, fixture_dir, precision):
    manifest = json.loads((shipped[precision] / "mixbuild.json").read_text())
    assert manifest["debug_outputs"] is False        # what users ship
    report = single_reports[precision]
    assert report.passed, [(c.name, c.value, c.judged) for c in report.failed_checks]
    assert report.skipped == () and report.non_finite == ()
    assert {c.name for c in report.checks} >= {"kl_mean", "top1_agreement", "ppl_rel_delta",
                                               "router_flip_rate", "expert_rel_error"}
    top1 = next(c for c in report.checks if c.name == "top1_agreement")
    assert top1.statistic == "lower95" and top1.judged < top1.value
    for layer in report.layers:
        assert layer.tokens == report.metrics.positions
        assert layer.hidden_rel_error is not None and layer.moe_input_rel_error is not None
        assert layer.router_flips is not None and layer.clear_flips is not None
        assert len(layer.expert_rel_error) == 8
        assert all((x is None) == (n == 0) for x, n in zip(layer.expert_rel_error,
                                                           layer.expert_tokens))


def test_validate_never_changes_the_shipped_files(shipped, fixture_dir, tmp_path):
    before = {p: digests(d) for p, d in shipped.items()}
    for path in shipped.values():
        validate_artifact(path, fixture_dir, tmp_path / path.name, **QUICK)
    assert {p: digests(d) for p, d in shipped.items()} == before


def serving_prefill(spec, seed: int, rows: int, seq: int, lengths: list[int], capacity: int = 16):
    """Feeds of one serving-layout prefill: `rows` prompts of `lengths` tokens into empty caches."""
    from mixbuild.contract import cache_pairs

    feeds = {"input_ids": np.random.default_rng(seed).integers(3, spec.vocab_size, (rows, seq)),
             "position_ids": np.tile(np.arange(seq), (rows, 1)),
             "cache_lengths": np.zeros(rows, np.int64), "input_lengths": np.array(lengths)}
    for name, _ in cache_pairs(spec.num_layers):
        feeds[name] = np.zeros((rows, spec.num_kv_heads, capacity, spec.head_dim), np.float32)
    return feeds


@pytest.mark.parametrize("precision", ["fp8", "int4"])
def test_the_diagnostic_session_computes_the_shipped_numbers(shipped, precision):
    artifact = Artifact.open(shipped[precision])
    spec = artifact.spec
    found = {}
    plain = OrtRunner(artifact)
    diag = OrtRunner(artifact, graph_rewrite=lambda m: found.setdefault(
        "e", expose(m, spec.num_layers, onnx.TensorProto.FLOAT, True, False)))
    assert diag.kernels == plain.kernels               # the same runtime rewrites
    feeds = serving_prefill(spec, 0, 2, 12, [12, 12])
    a, b = plain.infer(feeds), found["e"].rename(diag.infer(feeds))
    assert all(np.array_equal(a[k], b[k]) for k in a)  # bit for bit
    assert b["debug.2.expert_ids"].shape == (24, spec.top_k)
    assert b["debug.1.hidden"].shape == (2, 12, spec.hidden_size)


@pytest.mark.parametrize("damage, layer, expert, basis", [
    ("fp8 expert scale x4", 1, 3, "expert_rel_error"),
    ("int4 group scales shuffled", 1, None, "expert_rel_error"),
    ("fp8 o_proj zeroed", 1, None, "attention_growth"),
    ("int4 v_proj zeroed", 2, None, "attention_growth"),
])
def test_damage_fails_and_is_located(shipped, fixture_dir, tmp_path, damage, layer, expert, basis):
    source = shipped[damage.split()[0]]
    make = {"fp8 expert scale x4": lambda d: scale_expert(source, d, layer, expert),
            "int4 group scales shuffled": lambda d: shuffle_group_scales(source, d, layer),
            "fp8 o_proj zeroed": lambda d: zero_attention(source, d, layer, "o_proj"),
            "int4 v_proj zeroed": lambda d: zero_attention(source, d, layer, "v_proj")}[damage]
    report, out = validate_artifact(make(tmp_path / "damaged"), fixture_dir, tmp_path / "report",
                                    **QUICK)
    assert not report.passed
    assert (report.worst.layer, report.worst.basis) == (layer, basis)
    if expert is not None:
        assert report.worst.expert == expert
    text = (out / "report.md").read_text()
    assert f"worst: layer {layer}" in text


def test_several_artifacts_equal_their_single_runs(shipped, single_reports, fixture_dir, tmp_path):
    results, out = validate_artifacts([shipped["fp8"], shipped["int4"]], fixture_dir,
                                      tmp_path / "both", progress=False)
    assert [name for name, _ in results] == ["fp8", "int4"]
    for name, report in results:
        assert report.to_dict() == single_reports[name].to_dict()   # number for number
    table = (out / "report.md").read_text()
    assert table.count("| fp8 | PASSED | fp8 |") == 1 and table.count("| int4 | PASSED | int4 |") == 1
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((out / "fp8" / "report.json").read_text())["precision"] == "fp8"
    cli = CliRunner().invoke(main, ["validate", str(shipped["fp8"]), str(shipped["int4"]),
                                    "--reference", str(fixture_dir), "-o", str(tmp_path / "cli"),
                                    "--no-plot"])
    assert cli.exit_code == 0, cli.output
    assert "int4" in cli.output and "PASSED" in cli.output


@pytest.fixture(scope="session")
def serving_fixture(fixture_fp32_artifact):
    return fixture_fp32_artifact          # the default export: the serving layout


def test_serving_layout_on_the_fixture(serving_fixture, fixture_dir, tmp_path):
    report, _ = validate_artifact(serving_fixture, fixture_dir, tmp_path / "r", **QUICK)
    assert report.passed, report.failed_checks
    m = report.metrics
    assert m.top1_agreement == 1.0 and m.logits_max_abs < 1e-3
    assert m.greedy_match_steps == m.greedy_steps == 16
    assert all(lr.hidden_rel_error < 1e-5 and lr.router_flips == 0 for lr in report.layers)
    assert report.skipped == ()


def test_serving_all_position_logits_equal_the_shipped_last_ones(serving_fixture):
    artifact = Artifact.open(serving_fixture)
    spec = artifact.spec
    found = {}
    plain = OrtRunner(artifact)
    diag = OrtRunner(artifact, graph_rewrite=lambda m: found.setdefault(
        "e", expose(m, spec.num_layers, onnx.TensorProto.FLOAT, True, False)))
    rows, seq = 2, 9
    feeds = serving_prefill(spec, 1, rows, seq, [9, 5])
    last = plain.infer(feeds)["logits"]
    every = diag.infer(feeds)[ALL_LOGITS].reshape(rows, seq, -1)
    assert np.array_equal(every[0, 8], last[0]) and np.array_equal(every[1, 4], last[1])


def test_serving_layout_on_an_odd_config(hf_checkpoints, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoints["tiny-e4k1-mqa"], ckpt)   # 4 experts, top-1, one kv head
    write_char_tokenizer(ckpt / "tokenizer.json")
    artifact = export_checkpoint(ckpt, tmp_path / "serving", layout="serving", progress=False)
    report, _ = validate_artifact(artifact, ckpt, max_tokens=48, **QUICK)
    assert report.passed, report.failed_checks
    assert report.metrics.top1_agreement == 1.0 and report.skipped == ()
    assert all(len(lr.expert_rel_error) == 4 for lr in report.layers)


@pytest.mark.parametrize("layout", ["concat", "serving"])
def test_long_inputs_are_compared_chunk_by_chunk(fixture_concat_artifact, serving_fixture,
                                                 fixture_dir, layout):
    artifact = fixture_concat_artifact if layout == "concat" else serving_fixture
    chunked, _ = validate_artifact(artifact, fixture_dir, long=300, chunk=128, max_sequences=1,
                                   steps=2, progress=False, plot=False)
    assert chunked.passed, chunked.failed_checks
    assert chunked.metrics.positions == 300 and chunked.metrics.sequences == 1
    whole, _ = validate_artifact(artifact, fixture_dir, long=300, chunk=300, max_sequences=1,
                                 steps=2, progress=False, plot=False)
    assert whole.metrics.ppl_reference == pytest.approx(chunked.metrics.ppl_reference, rel=1e-6)
    assert whole.metrics.top1_agreement == chunked.metrics.top1_agreement == 1.0


def test_long_beyond_the_context_is_refused(fixture_fp32_artifact, fixture_dir):
    result = CliRunner().invoke(main, ["validate", str(fixture_fp32_artifact), "--reference",
                                       str(fixture_dir), "--long", "100000"])
    assert result.exit_code == 2 and "longer than the model's context" in result.output
