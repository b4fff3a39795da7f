"""Never call a wrong result right: non-finite weights and outputs are refused or fail
validation, and every input is checked where it enters (group sizes, token ids, calibration
text, options a precision ignores, bf16 on the CPU).

CLI tests drive `mixbuild` through click's CliRunner and check the exit code, the message and
that every input file is byte-identical afterwards (`digest`, as in tests/test_outputs.py)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mixbuild import cli
from mixbuild.contract import LOGITS, Debug, kv_pairs, past_key
from mixbuild.errors import ArtifactError, ConfigError, UsageError
from mixbuild.model.presets import PRESETS
from tests.conftest import edit_json
from tests.validate.conftest import write_char_tokenizer

TINY = PRESETS["tiny"]   # vocab 128, hidden 64, intermediate 96, 2 layers, 8 experts, top-2


def run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under (or at) `paths`."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out.update({str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    return out


def leftovers(out: Path) -> list[str]:
    """The output and any hidden sibling of it (tmp / old / scratch of the atomic helper)."""
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name == out.name or p.name.startswith(f".{out.name}."))


def poison(ckpt: Path, name: str, value: float, index=(0, 1)) -> None:
    """Write `value` into tensor `name` of a checkpoint copy, in place in its shard."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mixbuild.model.checkpoint import Checkpoint

    shard = Checkpoint(ckpt).tensors[name].file
    with safe_open(str(shard), "pt") as fh:
        tensors = {n: fh.get_tensor(n) for n in fh.keys()}  # noqa: SIM118 (no __iter__)
    tensors[name][index] = value
    save_file(tensors, shard, metadata={"format": "pt"})


EXPERT = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


# ============================================================ A1: export refuses NaN / Inf

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_export_refuses_non_finite_weights_naming_the_tensor(ckpt_copy, tmp_path, value):
    poison(ckpt_copy, EXPERT, value)
    before = digest(ckpt_copy)
    out = tmp_path / "art"
    result = run("export", ckpt_copy, "-o", out)
    assert result.exit_code == 2, result.output
    assert f"error: tensor '{EXPERT}' holds NaN or Inf values" in result.output
    kind = "1 NaN and 0 Inf" if math.isnan(value) else "0 NaN and 1 Inf"
    assert f"found:    {kind} among its 6144 values" in result.output
    assert "first at index [0, 1]" in result.output and "Traceback" not in result.output
    assert leftovers(out) == []                       # nothing that looks like an artifact
    assert digest(ckpt_copy) == before


def test_quantized_export_refuses_non_finite_weights_during_calibration(ckpt_copy, tmp_path):
    write_char_tokenizer(ckpt_copy / "tokenizer.json")
    poison(ckpt_copy, EXPERT, float("nan"))
    before = digest(ckpt_copy)
    out = tmp_path / "art"
    result = run("export", ckpt_copy, "-o", out, "--precision", "fp8", "--calib-tokens", 256)
    assert result.exit_code == 2, result.output
    assert f"error: tensor '{EXPERT}' holds NaN or Inf values" in result.output
    assert leftovers(out) == [] and digest(ckpt_copy) == before


def test_fp16_export_refuses_weights_that_overflow(ckpt_copy, tmp_path):
    poison(ckpt_copy, Q_PROJ, 1e6)                   # finite in fp32, beyond fp16's 65504
    before = digest(ckpt_copy)
    out = tmp_path / "art"
    result = run("export", ckpt_copy, "-o", out, "--dtype", "fp16")
    assert result.exit_code == 2, result.output
    assert ("error: weight 'layers.0.attn.q_proj.weight' is not finite as float16 converted "
            "from float32") in result.output
    assert "export with --dtype bf16 or fp32" in result.output
    assert leftovers(out) == [] and digest(ckpt_copy) == before


# ============================================= A2: torch backend and validate's reference

def test_torch_backend_refuses_non_finite_weights(ckpt_copy):
    write_char_tokenizer(ckpt_copy / "tokenizer.json")
    poison(ckpt_copy, Q_PROJ, float("-inf"), index=(5, 7))
    before = digest(ckpt_copy)
    result = run("run", ckpt_copy, "--prompt", "def f", "--max-new-tokens", 2)
    assert result.exit_code == 2, result.output
    assert f"error: tensor '{Q_PROJ}' holds NaN or Inf values" in result.output
    assert "first at index [5, 7]" in result.output
    assert digest(ckpt_copy) == before


def test_validate_refuses_a_non_finite_reference(ckpt_copy, tmp_path):
    from mixbuild.exporter.export import export_checkpoint

    write_char_tokenizer(ckpt_copy / "tokenizer.json")
    artifact = export_checkpoint(ckpt_copy, tmp_path / "art", progress=False)
    poison(ckpt_copy, EXPERT, float("nan"))
    before = digest(ckpt_copy, artifact)
    report = tmp_path / "report"
    result = run("validate", artifact, "--reference", ckpt_copy, "-o", report, "--no-plot",
                 "--steps", 2)
    assert result.exit_code == 2, result.output
    assert f"error: tensor '{EXPERT}' holds NaN or Inf values" in result.output
    assert leftovers(report) == [] and digest(ckpt_copy, artifact) == before


# ===================================================== A3: NaN / Inf fail every metric

class FakeRunner:
    """A deterministic numpy model behind the Runner contract: logits depend on the token and
    its position, the cache is zeros, debug outputs are derived from the tokens. `poison(call,
    feeds, outputs)` may write NaN / Inf into the outputs (call 0 is the first infer).

    Its logits peak at token 0 (cos 0 = 1), which is also the argmax / top-1 of an all-NaN row:
    exactly the case where NaN logits used to score top-1 1.0 and "matching" greedy tokens."""

    name = "fake"

    def __init__(self, spec=TINY, poison=None, debug=False) -> None:
        self.spec, self.poison, self.debug, self.calls = spec, poison, debug, 0

    def infer(self, feeds):
        s = self.spec
        ids, pos = feeds["input_ids"], feeds["position_ids"]
        b, n = ids.shape
        phase = (ids[..., None] + 1) * 0.37 + pos[..., None] * 0.11
        out = {LOGITS: np.cos(phase * np.arange(s.vocab_size)).astype(np.float32) * 4}
        for past, present in kv_pairs(s.num_layers):
            new = np.zeros((b, s.num_kv_heads, n, s.head_dim), np.float32)
            out[present] = np.concatenate([feeds[past], new], axis=2)
        if self.debug:
            for i in range(s.num_layers):
                router = np.cos(phase.reshape(b * n, 1) * np.arange(1, s.num_experts + 1) + i)
                out[Debug.ROUTER_LOGITS.name_for(i)] = router.astype(np.float32)
                out[Debug.EXPERT_IDS.name_for(i)] = np.argsort(-router, axis=-1, kind="stable")[
                    :, :s.top_k].astype(np.int32)
                out[Debug.HIDDEN.name_for(i)] = np.sin(phase * np.arange(s.hidden_size) + i).astype(
                    np.float32)
                out[Debug.MOE_INPUT.name_for(i)] = out[Debug.HIDDEN.name_for(i)].reshape(
                    b * n, s.hidden_size)
        if self.poison is not None:
            self.poison(self.calls, feeds, out)
        self.calls += 1
        return out


def batches():
    from mixbuild.validate.data import make_batches

    rng = np.random.default_rng(0)
    return make_batches([rng.integers(3, TINY.vocab_size, n) for n in (9, 6, 7)], 2)


def validate_fake(artifact_poison=None, reference_poison=None, steps=4, debug=False,
                  expert_weights=None):
    from mixbuild.validate.compare import validate
    from mixbuild.validate.tolerances import load_tolerances

    return validate(FakeRunner(poison=reference_poison, debug=debug),
                    FakeRunner(poison=artifact_poison, debug=debug), TINY, batches(), steps,
                    load_tolerances("fp32"), expert_weights)


def test_the_fake_artifact_passes_against_itself():
    report = validate_fake(debug=True)
    assert report.passed and report.non_finite == () and report.skipped == ()


def all_nan(call, feeds, out):
    out[LOGITS][:] = np.nan


def test_metrics_never_score_nan_as_agreement():
    from mixbuild.validate import metrics as M

    ref = np.cos(np.arange(24, dtype=np.float32)).reshape(3, 8)
    art = np.full_like(ref, np.nan)
    ref[:, 0] = 10.0                                   # the reference's argmax is token 0 ...
    assert int(np.argmax(art[0])) == 0                 # ... and so is an all-NaN row's
    assert math.isnan(M.max_abs_error(ref, art)) and math.isnan(M.mean_abs_error(ref, art))
    assert max(0.0, float("nan")) == 0.0               # why pooling must not use max()
    assert math.isnan(M.pooled_max([0.0, float("nan"), 1.0]))
    for per_position in (M.cosine_similarity(ref, art), M.kl_divergence(ref, art),
                         M.topk_agreement(ref, art, 1), M.topk_agreement(ref, art, 5),
                         M.logit_margin(art)):
        assert np.isnan(per_position).all()
    one_bad = ref.copy()
    one_bad[1, 3] = np.inf                              # only row 1 is not finite
    assert np.isnan(M.kl_divergence(ref, one_bad)).tolist() == [False, True, False]
    assert np.isnan(M.topk_agreement(ref, one_bad, 1)).tolist() == [False, True, False]
    nll, count = M.negative_log_likelihood(one_bad[None], np.zeros((1, 3), np.int64),
                                           np.ones((1, 3), bool))
    assert math.isnan(nll) and count == 3
    same = M.matching_prefix(np.zeros((1, 3)), np.zeros((1, 3)), valid=np.array([[1, 0, 1]], bool))
    assert same.tolist() == [1]


def test_nan_artifact_logits_fail_every_logits_check_and_the_report_says_why():
    import io

    from rich.console import Console

    from mixbuild.validate.report import print_summary, render_markdown, report_document

    report = validate_fake(artifact_poison=all_nan)
    assert not report.passed
    failed = {c.name for c in report.failed_checks}
    assert failed >= {"logits_max_abs", "logits_cosine_min", "kl_mean", "top1_agreement",
                      "ppl_rel_delta", "greedy_match_fraction"}
    assert report.skipped == ("router_flip_rate",)     # no debug outputs: not measurable
    positions = report.metrics.positions
    assert report.non_finite == (
        f"artifact logits contain NaN at {positions} of {positions} positions",
        "artifact logits contain NaN at 12 of 12 greedy steps")
    assert report.metrics.greedy_match_steps == 0 and report.metrics.first_divergence.step == 0
    assert report.metrics.top1_agreement_ci95[1] < 0.2   # NaN positions count as disagreements
    doc = report_document(report)
    assert doc["passed"] is False and doc["checks"]["top1_agreement"]["value"] is None
    assert doc["non_finite"][0].startswith("artifact logits contain NaN")
    text = render_markdown(report)
    assert "# Validation: FAILED" in text
    assert f"- **non-finite values**: artifact logits contain NaN at {positions} of" in text
    terminal = io.StringIO()
    print_summary(report, Console(file=terminal, width=200))
    assert "FAILED" in terminal.getvalue()
    assert f"non-finite values: artifact logits contain NaN at {positions} of" in terminal.getvalue()


def test_one_nan_position_is_enough_to_fail():
    def one(call, feeds, out):
        if call == 0:
            out[LOGITS][0, -2, 7] = np.nan   # a position that predicts a token

    report = validate_fake(artifact_poison=one, steps=0)
    assert not report.passed
    assert {"logits_max_abs", "logits_cosine_min", "kl_mean", "top1_agreement",
            "ppl_rel_delta"} <= {c.name for c in report.failed_checks}
    assert report.non_finite == (f"artifact logits contain NaN at 1 of {report.metrics.positions} "
                                 "positions",)


def test_non_finite_reference_logits_fail_too():
    def inf(call, feeds, out):
        out[LOGITS][:, :, 3] = np.inf

    report = validate_fake(reference_poison=inf, steps=2)
    assert not report.passed
    assert report.non_finite[0].startswith("reference logits contain Inf at ")
    assert report.non_finite[1] == "reference logits contain Inf at 6 of 6 greedy steps"


def test_nan_in_greedy_decode_steps_never_matches():
    def decode_only(call, feeds, out):
        if feeds[past_key(0)].shape[2] > 0:          # every decode step, never the prefill
            out[LOGITS][:] = np.nan

    report = validate_fake(artifact_poison=decode_only, steps=4)
    m = report.metrics
    assert m.top1_agreement == 1.0 and m.logits_max_abs == 0.0   # the prefill is clean
    assert (m.greedy_match_steps, m.greedy_steps) == (3, 12)      # step 0 of each row only
    assert [c.name for c in report.failed_checks] == ["greedy_match_fraction"]
    assert report.non_finite == ("artifact logits contain NaN at 9 of 12 greedy steps",)
    assert not report.passed


def test_nan_hidden_states_fail_the_report_even_when_every_check_passes():
    def hidden1(call, feeds, out):
        if call < 2:                                   # the teacher-forced pass
            out[Debug.HIDDEN.name_for(1)][:] = np.nan

    report = validate_fake(artifact_poison=hidden1, steps=0, debug=True)
    assert report.failed_checks == () and not report.passed
    assert math.isnan(report.layers[1].hidden_max_abs) and report.layers[0].hidden_max_abs == 0
    assert (report.worst.layer, report.worst.basis) == (1, "hidden_non_finite")
    positions = report.metrics.positions
    assert report.non_finite == (
        f"artifact hidden states of layer 1 contain NaN at {positions} of {positions} positions",)


def test_nan_router_logits_count_as_flips():
    def router1(call, feeds, out):
        if call < 2:
            out[Debug.ROUTER_LOGITS.name_for(1)][0] = np.nan   # token 0 of each batch

    report = validate_fake(artifact_poison=router1, steps=0, debug=True)
    assert [c.name for c in report.failed_checks] == ["router_flip_rate"]
    assert (report.layers[0].router_flips, report.layers[1].router_flips) == (0, 2)
    assert report.non_finite == (
        f"artifact router logits of layer 1 contain NaN at 2 of {report.layers[1].tokens} "
        "positions",)


def test_a_nan_expert_error_is_not_an_unused_expert():
    from mixbuild.validate.experts import ExpertWeightPair

    rng = np.random.default_rng(1)
    e, h, i = TINY.num_experts, TINY.hidden_size, TINY.intermediate_size
    weights = [(rng.normal(size=(e, 2 * i, h)).astype(np.float32) * 0.1,
                rng.normal(size=(e, h, i)).astype(np.float32) * 0.1) for _ in range(TINY.num_layers)]
    broken = [(gu, d.copy()) for gu, d in weights]
    broken[1][1][:] = np.nan                           # every expert of layer 1
    report = validate_fake(steps=0, debug=True, expert_weights=ExpertWeightPair(
        weights.__getitem__, broken.__getitem__))
    assert report.failed_checks == () and not report.passed
    used = [x for x, n in zip(report.layers[1].expert_max_abs, report.layers[1].expert_tokens) if n]
    assert used and all(x is not None and math.isnan(x) for x in used)
    assert (report.worst.layer, report.worst.basis) == (1, "expert_max_abs")
    assert report.non_finite[0].startswith("expert output error of layer 1, expert ")
    assert all(x in (0.0, None) for x in report.layers[0].expert_max_abs)   # same weights


def test_tolerance_checks_fail_on_any_non_finite_value():
    from mixbuild.validate.tolerances import load_tolerances

    tol = load_tolerances("fp32")
    for value in (math.nan, math.inf, -math.inf):
        assert not tol.check("kl_mean", value).passed
        assert not tol.check("ppl_rel_delta", value).passed
        assert not tol.check("top1_agreement", value).passed


# ====================================================== A4: the runtime refuses NaN logits

def fake_model(poison=None, **kwargs):
    from mixbuild.runtime import Model

    return Model.from_runner(FakeRunner(poison=poison), **kwargs)


def test_runtime_refuses_nan_logits_naming_the_step_and_row():
    def row1_step2(call, feeds, out):
        if call == 2:
            out[LOGITS][1, -1, 5] = np.nan

    with pytest.raises(ArtifactError) as err:
        fake_model(row1_step2).generate_ids([[5, 6, 7], [8, 9]], max_new_tokens=6)
    text = str(err.value)
    assert text.startswith("the model produced non-finite logits for request 1 (batch row 1) "
                           "at generation step 2 (decode step 2)")
    assert "1 NaN and 0 Inf among 128 vocabulary entries" in text
    assert "fix:      the model computes NaN/Inf" in text and "mixbuild validate" in text


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 1},
                                      {"repetition_penalty": 1.3}])
def test_runtime_refuses_nan_prefill_logits_for_every_sampler(sampling):
    with pytest.raises(ArtifactError, match=r"request 0 \(batch row 0\) at generation step 0 "
                                            r"\(the prompt's prefill\)"):
        fake_model(all_nan).generate_ids([[5, 6]], max_new_tokens=3, **sampling)


def test_runtime_names_the_request_across_batches():
    def second_batch(call, feeds, out):
        if call >= 3:                                 # max_new_tokens=3: calls 0-2 are batch 0
            out[LOGITS][:] = np.inf

    with pytest.raises(ArtifactError, match=r"request 1 \(batch row 0\) at generation step 0"):
        fake_model(second_batch, max_batch=1).generate_ids([[5], [6]], max_new_tokens=3)


# ========================================================== B5: int4 group size divides K

def test_int4_group_size_must_divide_every_reduction_size(ckpt_copy, tmp_path):
    before = digest(ckpt_copy)
    out = tmp_path / "art"
    result = run("export", ckpt_copy, "-o", out, "--precision", "int4", "--group-size", 48)
    assert result.exit_code == 2, result.output
    assert ("error: --group-size 48 does not divide the int4 reduction size(s) hidden_size "
            "(attention q/k/v, expert w_gate_up) = 64, num_heads * head_dim (attention o_proj) "
            "= 64") in result.output
    assert "intermediate_size" not in result.output.splitlines()[0]   # 96 = 2 * 48 is fine
    assert "fix:      pass --group-size 2 | 4 | 8 | 16 | 32" in result.output
    result = run("export", ckpt_copy, "-o", out, "--precision", "int4")   # the default, 128
    assert result.exit_code == 2 and "--group-size 128 does not divide" in result.output
    assert leftovers(out) == [] and digest(ckpt_copy) == before


def test_group_size_is_checked_against_every_k_in_the_library():
    from mixbuild.quant.config import QuantConfig

    spec = PRESETS["tiny-e8k3-mha"]                  # H 32, Nq*D 48, I 40: gcd 8
    QuantConfig.parse("int4", group_size=8).check_spec(spec)
    QuantConfig.parse("fp8").check_spec(spec)       # fp8 has no groups
    with pytest.raises(UsageError) as err:
        QuantConfig.parse("int4", group_size=16).check_spec(spec)
    assert "num_heads * head_dim (attention o_proj) = 48" not in err.value.what   # 48 = 3 * 16
    assert "intermediate_size (expert w_down) = 40" in err.value.what
    assert err.value.hint == "pass --group-size 2 | 4 | 8"


# ================================================================ B6: token ids in range

@pytest.fixture
def runnable_ckpt(ckpt_copy):
    """The tiny checkpoint with a tokenizer: `mixbuild run` can open it (torch backend)."""
    write_char_tokenizer(ckpt_copy / "tokenizer.json")
    return ckpt_copy


def test_stop_token_id_outside_the_vocabulary(runnable_ckpt):
    before = digest(runnable_ckpt)
    result = run("run", runnable_ckpt, "--prompt", "def f", "--stop-token-id", 7,
                 "--stop-token-id", 128)
    assert result.exit_code == 2, result.output
    assert "error: stop token id 128 is outside the vocabulary" in result.output
    assert "expected: token ids in [0, 128) (vocab_size 128)" in result.output
    assert "found:    stop_token_ids=[7, 128]" in result.output
    assert digest(runnable_ckpt) == before


@pytest.mark.parametrize("field, value, message", [
    ("eos_token_id", 128, "eos_token_id holds 128, which is outside the vocabulary"),
    ("eos_token_id", [2, 3.5], "eos_token_id holds 3.5, which is not a token id"),
    ("eos_token_id", True, "eos_token_id holds True, which is not a token id"),
    ("pad_token_id", -1, "pad_token_id holds -1, which is outside the vocabulary"),
    ("pad_token_id", [0], "pad_token_id holds [0], which is not a token id")])
def test_generation_config_token_ids(runnable_ckpt, field, value, message):
    path = runnable_ckpt / "generation_config.json"
    edit_json(path, **{field: value})
    before = digest(runnable_ckpt)
    result = run("run", runnable_ckpt, "--prompt", "def f", "--max-new-tokens", 1)
    assert result.exit_code == 2, result.output
    assert f"error: {path}: {message}" in result.output
    assert "integers in [0, 128) (vocab_size 128)" in result.output
    assert digest(runnable_ckpt) == before


def test_config_json_eos_outside_the_vocabulary(runnable_ckpt):
    edit_json(runnable_ckpt / "config.json", eos_token_id=[2, 500])
    before = digest(runnable_ckpt)
    result = run("run", runnable_ckpt, "--prompt", "def f")
    assert result.exit_code == 2, result.output
    assert "eos_token_id" in result.output and "[0, 128)" in result.output
    assert "500" in result.output and digest(runnable_ckpt) == before


def test_generation_config_library_check():
    from mixbuild.model.generation import token_ids
    from mixbuild.runtime.sampling import GenerationDefaults

    assert token_ids([2, np.int64(3)], 128, "x") == (2, 3)
    with pytest.raises(ConfigError, match=r"holds 2\.0, which is not a token id"):
        token_ids(2.0, 128, "x")
    assert GenerationDefaults.read(Path("/nonexistent"), 2, 128).eos_token_ids == (2,)


@pytest.mark.parametrize("prompt, message", [
    ([5, 6.0], r"prompt 0 is not a list of token ids: position 1 holds 6.0 \(float\)"),
    ([True, 6], r"prompt 0 is not a list of token ids: position 0 holds True \(bool\)"),
    ([5, np.float32(2)], r"position 1 holds np.float32\(2.0\) \(float32\)"),
    ([5, "6"], r"position 1 holds '6' \(str\)"),
    ([5, 6, 128], r"prompt 0 holds token id 128 at position 2, outside the vocabulary"),
    ([-1], r"prompt 0 holds token id -1 at position 0, outside the vocabulary")])
def test_prompt_token_ids_are_integers_in_range(prompt, message):
    with pytest.raises(UsageError, match=message) as err:
        fake_model().generate_ids([prompt], max_new_tokens=1)
    assert "[0, 128)" in str(err.value)


def test_integer_prompts_of_any_integer_type_still_work():
    result = fake_model().generate_ids([np.array([5, 6], np.int32), [np.int64(7)]],
                                       max_new_tokens=2)
    assert [len(r.token_ids) for r in result] == [2, 2]


# ===================================================================== B7: calibration text

@pytest.mark.parametrize("content, message", [
    (b"\x7fELF\x02\x01\x01\x00\x00binary", "is binary, not text"),
    ("caf\u00e9 au lait\n".encode("latin-1"), "is not UTF-8 text"),
    ("text".encode("utf-16"), "is binary, not text"),
    (b"", "is empty"),
    (b"  \n\t\n", "is empty")])
def test_calibration_file_must_be_utf8_text(ckpt_copy, tmp_path, content, message):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    before = digest(ckpt_copy, calib)
    out = tmp_path / "art"
    result = run("export", ckpt_copy, "-o", out, "--precision", "fp8", "--calib", calib)
    assert result.exit_code == 2, result.output
    assert f"error: calibration file {calib} {message}" in result.output
    assert leftovers(out) == [] and digest(ckpt_copy, calib) == before


def test_calibration_error_names_the_bad_byte(tmp_path):
    from mixbuild.quant.calibrate import read_calibration_text

    calib = tmp_path / "calib.txt"
    calib.write_bytes(b"abc\xe9def")
    with pytest.raises(UsageError) as err:
        read_calibration_text(calib)
    assert err.value.found == "byte 0xe9 at offset 3 is not valid UTF-8"
    calib.write_bytes("\ufeffdef f():\n    return 1\n".encode())   # a BOM is fine
    assert read_calibration_text(calib).startswith("def f")


# ========================================================== B8: options a precision ignores

@pytest.mark.parametrize("args, message", [
    (["--group-size", 64], "--group-size has no effect with --precision float"),
    (["--precision", "fp8", "--group-size", 128], "--group-size has no effect with --precision fp8"),
    (["--precision", "fp8", "--int4-method", "rtn"],
     "--int4-method has no effect with --precision fp8"),
    (["--precision", "int4", "--fp8-weight-scales", "tensor"],
     "--fp8-weight-scales has no effect with --precision int4"),
    (["--fp8-weight-scales", "channel"], "--fp8-weight-scales has no effect with --precision float"),
    (["--calib-tokens", 512], "--calib-tokens has no effect with --precision float"),
    (["--calib", "CALIB"], "--calib has no effect with --precision float")])
def test_options_the_precision_ignores_are_refused(ckpt_copy, tmp_path, args, message):
    calib = tmp_path / "calib.txt"
    calib.write_text("def f():\n    return 1\n")
    args = [calib if a == "CALIB" else a for a in args]
    before = digest(ckpt_copy, calib)
    out = tmp_path / "art"
    result = run("export", ckpt_copy, "-o", out, *args)
    assert result.exit_code == 2, result.output
    assert f"error: {message}" in result.output
    assert "fix:      drop --" in result.output
    assert leftovers(out) == [] and digest(ckpt_copy, calib) == before


def test_options_of_the_chosen_precision_pass_the_option_check(ckpt_copy, tmp_path):
    """int4 with its own options gets past the option check (to the group-size check)."""
    out = tmp_path / "art"
    result = run("export", ckpt_copy, "-o", out, "--precision", "int4", "--int4-method", "rtn",
                 "--group-size", 48, "--calib-tokens", 256)
    assert result.exit_code == 2 and "--group-size 48 does not divide" in result.output
    assert "has no effect" not in result.output


# ================================================================= B9: bf16 and the CPU

def test_bf16_export_warns_and_running_it_on_the_cpu_says_what_to_do(ckpt_copy, tmp_path):
    out = tmp_path / "art"
    before = digest(ckpt_copy)
    result = run("export", ckpt_copy, "-o", out, "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [line for line in warnings if "bf16 artifact" in line] and len(warnings) == 1
    assert "GPU provider" in warnings[0] and "TensorRT" in warnings[0]
    assert "--dtype fp32 or fp16 for ONNX Runtime on the CPU" in warnings[0]
    assert digest(ckpt_copy) == before
    art_before = digest(out)
    result = run("run", out, "--prompt", "def f")
    assert result.exit_code == 2, result.output
    assert "error: ONNX Runtime on the CPU cannot run bfloat16 artifacts" in result.output
    assert "fix:      re-export with `mixbuild export ... --dtype fp32`" in result.output
    assert "TensorRT engine with `mixbuild engine`" in result.output
    assert "--device cuda" in result.output and "Traceback" not in result.output
    assert digest(out) == art_before


@pytest.mark.parametrize("dtype, warns", [("bf16", True), ("fp16", False), ("fp32", False)])
def test_only_bf16_exports_warn(ckpt_copy, tmp_path, dtype, warns):
    """Cheaply, on an export refused later (its group size): the warning depends on --dtype."""
    result = run("export", ckpt_copy, "-o", tmp_path / "art", "--dtype", dtype,
                 "--precision", "int4", "--group-size", 48)
    assert result.exit_code == 2 and "--group-size 48 does not divide" in result.output
    assert ("warning: ONNX Runtime's CPU provider cannot run a bf16 artifact"
            in result.stderr) is warns
