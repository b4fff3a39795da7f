"""Tolerances are data: every precision loads, overrides are checked, directions are right."""

import dataclasses
import json
import math

import pytest

from mixbuild.contract import Precision
from mixbuild.errors import MixbuildError
from mixbuild.validate.tolerances import (
    THRESHOLDS,
    Bound,
    Tolerances,
    load_table,
    load_tolerances,
    parse_override,
)

ORDER = ["fp32", "fp16", "bf16", "fp8", "int4"]


@pytest.mark.parametrize("precision", ORDER)
def test_every_precision_loads_and_validates(precision):
    tol = load_tolerances(precision)
    assert tol.precision is Precision(precision)
    tol.validate()
    assert set(THRESHOLDS) <= set(tol.to_dict())


def test_headline_numbers():
    fp32, fp8, int4 = (load_tolerances(p) for p in ("fp32", "fp8", "int4"))
    assert fp32.logits_max_abs == 1e-3 and fp32.top1_agreement == 1.0
    # judged on 95% lower bounds (docs/validation.md): 0.93 / 0.85 of the interval's lower end
    assert fp8.top1_agreement >= 0.93 and fp8.ppl_rel_delta <= 0.02
    assert int4.top1_agreement >= 0.85 and int4.ppl_rel_delta <= 0.05


def test_thresholds_loosen_as_precision_drops():
    tols = [load_tolerances(p) for p in ORDER]
    for name, bound in THRESHOLDS.items():
        values = [getattr(t, name) for t in tols]
        if bound is Bound.AT_LEAST:
            assert values == sorted(values, reverse=True), name
        else:
            assert values == sorted(values), name


def test_override_applies_and_is_checked():
    tol = load_tolerances("fp8", overrides={"top1_agreement": 0.95})
    assert tol.top1_agreement == 0.95
    assert tol.kl_mean == load_tolerances("fp8").kl_mean
    with pytest.raises(MixbuildError, match=r"unknown tolerance name.*top1_agreemnt"):
        load_tolerances("fp8", overrides={"top1_agreemnt": 0.95})
    with pytest.raises(MixbuildError, match="must be a number"):
        load_tolerances("fp8", overrides={"kl_mean": "small"})
    with pytest.raises(MixbuildError, match="out of range"):
        load_tolerances("fp8", overrides={"top1_agreement": 1.5})
    with pytest.raises(MixbuildError, match="out of range"):
        load_tolerances("fp8", overrides={"logits_max_abs": -1})


def test_unknown_precision():
    with pytest.raises(MixbuildError, match="unknown precision 'fp4'") as info:
        load_tolerances("fp4")
    assert "int4" in info.value.expected
    assert load_tolerances("float16").precision is Precision.FP16


def test_frozen():
    tol = load_tolerances("fp32")
    with pytest.raises(dataclasses.FrozenInstanceError):
        tol.kl_mean = 1.0


def test_check_directions():
    tol = load_tolerances("fp8")
    assert tol.check("top1_agreement", 0.98).passed
    assert not tol.check("top1_agreement", 0.92).passed
    assert tol.check("kl_mean", 0.01).passed
    assert not tol.check("kl_mean", 0.03).passed
    assert tol.check("ppl_rel_delta", -0.005).passed           # magnitude bound
    assert not tol.check("ppl_rel_delta", -0.03).passed
    assert not tol.check("logits_max_abs", math.nan).passed    # NaN never passes
    check = tol.check("logits_cosine_min", 0.99)
    assert (check.bound, check.threshold, check.passed) == (">=", 0.97, True)


def test_custom_table_file(tmp_path):
    table = load_table()
    table["fp8"]["top1_agreement"] = 0.5
    path = tmp_path / "tol.json"
    path.write_text(json.dumps(table))
    assert load_tolerances("fp8", path=path).top1_agreement == 0.5
    del table["fp8"]["kl_mean"]
    path.write_text(json.dumps(table))
    with pytest.raises(MixbuildError, match=r"missing tolerance.*kl_mean"):
        load_tolerances("fp8", path=path)
    path.write_text("{not json")
    with pytest.raises(MixbuildError, match="not valid JSON"):
        load_tolerances("fp8", path=path)
    path.write_text(json.dumps({"fp32": table["fp32"]}))
    with pytest.raises(MixbuildError, match="no thresholds for precision 'fp8'"):
        load_tolerances("fp8", path=path)
    with pytest.raises(MixbuildError, match="not found"):
        load_tolerances("fp8", path=tmp_path / "missing.json")


def test_parse_override():
    assert parse_override("top1_agreement=0.95") == ("top1_agreement", 0.95)
    with pytest.raises(MixbuildError, match="NAME=VALUE"):
        parse_override("top1_agreement")
    with pytest.raises(MixbuildError, match="unknown tolerance"):
        parse_override("top1=0.9")
    with pytest.raises(MixbuildError, match="not a number"):
        parse_override("kl_mean=abc")


def test_direct_construction_validates():
    with pytest.raises(MixbuildError, match="router_flip_rate"):
        Tolerances(Precision.FP32, 1e-3, 0.9, 1e-3, 1.0, 1e-3, 1.0, router_flip_rate=2.0)


def test_sampled_checks_judge_the_unfavourable_end_of_the_interval():
    tol = load_tolerances("fp8")
    inside = tol.check("top1_agreement", 0.9697, (0.957, 0.979))      # above 0.93 even at 0.957
    assert inside.passed and (inside.judged, inside.statistic) == (0.957, "lower95")
    noisy = tol.check("top1_agreement", 0.94, (0.91, 0.96))            # value passes, interval not
    assert not noisy.passed and noisy.judged == 0.91
    assert not tol.check("kl_mean", 0.015, (0.01, 0.025)).passed      # upper end 0.025 > 0.02
    far = tol.check("ppl_rel_delta", 0.001, (-0.025, 0.01))
    assert (far.judged, far.statistic, far.passed) == (0.025, "far95", False)
    exact = load_tolerances("fp32")
    one = exact.check("top1_agreement", 1.0, (0.996, 1.0))            # 1.0 is exact: the value
    assert one.passed and one.statistic == "value"
    assert not exact.check("router_flip_rate", 0.001, (0.0, 0.005)).passed   # 0 is exact too
