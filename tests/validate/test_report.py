"""report.json / report.md / report.png, written atomically, and the terminal summary."""

import json

import pytest

from mixbuild.errors import MixbuildError
from mixbuild.validate import report as R
from mixbuild.validate.compare import worst_location
from mixbuild.validate.metrics import Divergence
from mixbuild.validate.result import Check, LayerReport, Metrics, Report, Worst

METRIC_KEYS = {"logits_max_abs", "logits_cosine_min", "kl_mean", "top1_agreement", "top5_agreement",
               "ppl_reference", "ppl_artifact", "ppl_rel_delta", "greedy_match_steps", "greedy_steps",
               "first_divergence"}
LAYER_KEYS = {"layer", "hidden_max_abs", "router_logits_max_abs", "router_flip_rate",
              "near_tie_flips", "expert_max_abs"}


def make_report(passed=False, experts=True, nan_ppl=False) -> Report:
    metrics = Metrics(
        positions=40, sequences=4, logits_max_abs=0.5, logits_mean_abs=0.01, logits_cosine_min=0.99,
        kl_mean=0.004, kl_max=0.05, top1_agreement=0.975, top5_agreement=0.95,
        ppl_reference=10.0, ppl_artifact=float("nan") if nan_ppl else 10.2, ppl_rel_delta=0.02,
        greedy_steps=32, greedy_match_steps=20, greedy_match_fraction=0.625,
        first_divergence=Divergence(sequence=1, step=4, reference_token=7, artifact_token=9, margin=0.03),
        router_flip_rate=0.05, router_flip_rate_mean=0.03, top1_agreement_ci95=(0.87, 0.99))
    layers = tuple(
        LayerReport(layer=i, hidden_max_abs=[0.0, 0.01, 0.3][i], router_logits_max_abs=0.001 * i,
                    router_flip_rate=0.025 * i, router_flips=i, near_tie_flips=i // 2, tokens=40,
                    expert_max_abs=(0.001, None, 0.02 * i, 0.003) if experts else (),
                    expert_tokens=(20, 0, 40, 20) if experts else ())
        for i in range(3))
    checks = (Check("top1_agreement", 0.975, 0.97, ">=", True),
              Check("ppl_rel_delta", 0.02, 0.01, "|x| <=", False))
    return Report(passed=passed, precision="fp8", backend="ort", reference="transformers",
                  metrics=metrics, layers=layers, checks=checks, worst=worst_location(layers),
                  skipped=("router_flip_rate",) if not experts else ())


def test_report_json_schema(tmp_path):
    out = R.write_report(make_report(), tmp_path / "val")
    doc = json.loads((out / "report.json").read_text())
    assert doc["passed"] is False and doc["precision"] == "fp8" and doc["backend"] == "ort"
    assert set(doc["metrics"]) >= METRIC_KEYS
    assert doc["metrics"]["first_divergence"] == {"sequence": 1, "step": 4, "reference_token": 7,
                                                   "artifact_token": 9, "margin": 0.03}
    assert len(doc["layers"]) == 3 and all(set(layer) >= LAYER_KEYS for layer in doc["layers"])
    assert doc["layers"][0]["expert_max_abs"] == [0.001, None, 0.0, 0.003]
    assert doc["checks"]["ppl_rel_delta"] == {"value": 0.02, "threshold": 0.01, "bound": "|x| <=",
                                              "passed": False, "judged": None,
                                              "statistic": "value", "interval": None}
    assert doc["worst"] == {"layer": 2, "expert": 2, "value": 0.04, "basis": "expert_max_abs"}


def test_nan_becomes_null(tmp_path):
    out = R.write_report(make_report(nan_ppl=True), tmp_path / "val", plot=False)
    text = (out / "report.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["metrics"]["ppl_artifact"] is None


def test_png_is_valid(tmp_path):
    out = R.write_report(make_report(), tmp_path / "val")
    data = (out / "report.png").read_bytes()
    assert data.startswith(R.PNG_SIGNATURE)
    from matplotlib.image import imread

    image = imread(out / "report.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300


def test_png_without_expert_errors_or_layer_data(tmp_path):
    report = make_report(experts=False)
    R.plot_report(report, tmp_path / "a.png")
    bare = Report(**{**report.__dict__, "layers": ()})
    R.plot_report(bare, tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes().startswith(R.PNG_SIGNATURE)


def test_markdown_summary_and_layer_table():
    text = R.render_markdown(make_report())
    assert text.startswith("# Validation: FAILED")
    assert "| ppl_rel_delta | 0.02 | — | 0.02 | \\|x\\| <= | 0.01 | **FAIL** |" in text
    assert "| 2 | — | — | 0.3 | 0.002 | 0.05 | 2 | 1 | 2 (max abs 0.04) |" in text
    assert "first divergence: sequence 1, step 4" in text
    assert "worst: layer 2, expert 2" in text
    assert "## Per-expert output max abs error" in text
    assert "top-1 agreement 0.9750 (95% interval 0.8700-0.9900 over 40 positions)" in text


def test_write_is_atomic_and_replaces(tmp_path, monkeypatch):
    target = tmp_path / "val"
    R.write_report(make_report(passed=True), target, plot=False)
    assert json.loads((target / "report.json").read_text())["passed"] is True

    def broken(report, path):
        raise RuntimeError("disk full")
    monkeypatch.setattr(R, "plot_report", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        R.write_report(make_report(passed=False), target, overwrite=True)
    assert json.loads((target / "report.json").read_text())["passed"] is True  # old one intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]               # no temp left

    monkeypatch.undo()
    with pytest.raises(MixbuildError, match="already exists"):
        R.write_report(make_report(passed=False), target)                     # no --overwrite
    R.write_report(make_report(passed=False), target, overwrite=True)
    assert json.loads((target / "report.json").read_text())["passed"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]
    assert sorted(p.name for p in target.iterdir()) == ["report.json", "report.md", "report.png"]


def test_report_path_that_is_a_file(tmp_path):
    (tmp_path / "val").write_text("x")
    with pytest.raises(MixbuildError, match="not a directory"):
        R.write_report(make_report(), tmp_path / "val")


def test_print_summary():
    from rich.console import Console

    console = Console(record=True, width=120)
    R.print_summary(make_report(), console=console)
    text = console.export_text()
    assert "FAILED" in text and "ppl_rel_delta" in text and "|x| <= 0.01" in text
    assert "worst: layer 2, expert 2" in text
    assert "95% interval 0.8700-0.9900 over 40 positions" in text


def test_worst_location_rules():
    def layer(i, hidden, experts=()):
        return LayerReport(layer=i, hidden_max_abs=hidden, router_logits_max_abs=None,
                           router_flip_rate=None, router_flips=None, near_tie_flips=None, tokens=0,
                           expert_max_abs=experts)
    # expert errors win
    assert worst_location([layer(0, 0.1, (0.0, 0.5)), layer(1, 9.0, (0.2, None))]) == \
        Worst(layer=0, expert=1, value=0.5, basis="expert_max_abs")
    # otherwise the largest growth of the hidden error
    got = worst_location([layer(0, 0.1), layer(1, 2.0), layer(2, 2.5)])
    assert (got.layer, got.expert, got.basis) == (1, None, "hidden_growth")
    assert got.value == pytest.approx(1.9)
    # all-zero expert errors fall back to hidden growth; nothing at all gives None
    assert worst_location([layer(0, 0.3, (0.0, 0.0))]).basis == "hidden_growth"
    assert worst_location([layer(0, 0.0, (0.0,))]) is None
    assert worst_location([layer(0, None)]) is None
