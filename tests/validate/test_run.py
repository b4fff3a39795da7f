"""`mixbuild validate` on real artifacts: a clean export passes; a damaged expert is found."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from mixbuild.cli import main
from mixbuild.exporter.export import export_checkpoint
from mixbuild.validate.run import validate_artifact
from tests.validate.damage import edit_initializer


@pytest.fixture(scope="session")
def debug_artifact(fixture_dir, tmp_path_factory):
    return export_checkpoint(fixture_dir, tmp_path_factory.mktemp("val") / "fp32", debug_outputs=True,
                             progress=False)


def damage_expert(artifact, dst, layer, expert, factor=1.5):
    """Scale one expert's gate_up rows inside model.onnx.data and re-hash, so the artifact
    looks valid but computes something else."""

    def scale(w):
        w[expert] *= factor
        return w
    return edit_initializer(artifact, dst, f"layers.{layer}.moe.w_gate_up", scale)


def test_clean_artifact_passes_with_full_agreement(debug_artifact, fixture_dir, tmp_path):
    report, report_dir = validate_artifact(debug_artifact, fixture_dir, tmp_path / "report",
                                           progress=False)
    assert report.passed
    assert report.metrics.top1_agreement == 1.0
    assert report.metrics.greedy_match_steps == report.metrics.greedy_steps > 0
    doc = json.loads((report_dir / "report.json").read_text())
    assert doc["passed"] is True and doc["precision"] == "fp32" and doc["backend"] == "ort"
    for key in ("logits_max_abs", "logits_cosine_min", "kl_mean", "top1_agreement", "ppl_reference",
                "ppl_artifact", "greedy_match_steps"):
        assert key in doc["metrics"]
    assert [layer["layer"] for layer in doc["layers"]] == [0, 1, 2]
    assert all("hidden_max_abs" in layer and "router_flip_rate" in layer for layer in doc["layers"])


@pytest.mark.parametrize("layer, expert", [(1, 5)])
def test_damaged_expert_is_located(debug_artifact, fixture_dir, tmp_path, layer, expert):
    damaged = damage_expert(debug_artifact, tmp_path / "damaged", layer, expert)
    report, _ = validate_artifact(damaged, fixture_dir, tmp_path / "report", progress=False)
    assert not report.passed
    assert (report.worst.layer, report.worst.expert) == (layer, expert)
    errors = report.layers[layer].expert_max_abs
    assert int(np.argmax(errors)) == expert
    assert report.layers[layer - 1].hidden_max_abs < 1e-3 < report.layers[layer].hidden_max_abs


def test_cli_exit_codes(debug_artifact, fixture_dir, tmp_path):
    ok = CliRunner().invoke(main, ["validate", str(debug_artifact), "--reference", str(fixture_dir),
                                   "-o", str(tmp_path / "ok"), "--max-sequences", "2", "--steps", "4"])
    assert ok.exit_code == 0, ok.output
    assert "PASSED" in ok.output
    damaged = damage_expert(debug_artifact, tmp_path / "damaged", 0, 2, factor=3.0)
    bad = CliRunner().invoke(main, ["validate", str(damaged), "--reference", str(fixture_dir),
                                    "-o", str(tmp_path / "bad"), "--max-sequences", "2", "--steps", "4"])
    assert bad.exit_code == 1 and "FAILED" in bad.output
    usage = CliRunner().invoke(main, ["validate", str(debug_artifact), "--reference", str(fixture_dir),
                                      "--tolerance", "no_such_metric=1"])
    assert usage.exit_code == 2 and "error:" in usage.output
    corrupt = tmp_path / "corrupt"
    shutil.copytree(debug_artifact, corrupt)
    (corrupt / "model.onnx.data").write_bytes(b"\0" * 16)
    refused = CliRunner().invoke(main, ["validate", str(corrupt), "--reference", str(fixture_dir)])
    assert refused.exit_code == 2 and "wrong size" in refused.output
