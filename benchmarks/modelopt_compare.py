"""Quantization accuracy: mixbuild's fp8/int4 export vs NVIDIA ModelOpt, in one run.

    pip install -e '.[bench]'
    OMP_NUM_THREADS=1 python benchmarks/modelopt_compare.py --threads 1

Both sides quantize the trained fixture (mixbuild/fixtures/tiny-code) and are judged the same way:

- ModelOpt: `mtq.quantize` on transformers' fp32 MixtralForCausalLM with `mtq.FP8_DEFAULT_CFG`
  (W8A8 E4M3, per-tensor scales) and `mtq.INT4_AWQ_CFG` (W4A16, AWQ-lite, group 128),
  calibrated on the token batches mixbuild's own calibration makes by default
  (`calibration_tokens`: the built-in standard-library text, 4096 tokens in sequences of 256);
  evaluated as fake quantization in torch.
- mixbuild: `export_checkpoint(..., quant=QuantConfig.parse(precision))`, the defaults of
  `mixbuild export --precision fp8|int4` (fp8: W8A8 E4M3, per-channel weight scales; int4:
  W4A16, AWQ + GPTQ, group 128), run on ONNX Runtime CPU. Exported with debug outputs (extra
  graph outputs only, the same quantized weights) so the router flip rate can be measured.

Every row goes through `mixbuild.validate.compare.validate` against the fp32 transformers
reference on `mixbuild validate`'s default evaluation data (built-in text, sequences of 128
tokens, at most 8 of them, batches of 4), so the metrics are computed by the same code:
top-1 agreement, relative perplexity change, mean KL(reference || quantized), router flip rate
(pooled over layers / worst layer), greedy match over --steps tokens, and whether the row meets
`mixbuild validate`'s thresholds for its precision. Neither side quantizes lm_head or the router.
The notes under the table count the modules ModelOpt gave enabled, calibrated quantizers (and
AWQ scales). On CPU ModelOpt fake-quantizes with its pure-torch paths (FP8: a cast through
torch.float8_e4m3fn; INT4: its legacy torch quantizer); its CUDA extensions serve CUDA tensors.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIXTURE = ROOT / "mixbuild" / "fixtures" / "tiny-code"
QUANTIZE_TIME_NOTE = ("quantize s: ModelOpt, the mtq.quantize call (fake quantization, nothing "
                      "written); mixbuild, the whole export (calibration, quantization, ONNX)")
MODELOPT_CONFIGS = {"fp8": ("FP8_DEFAULT_CFG", "ModelOpt"),
                    "int4": ("INT4_AWQ_CFG", "ModelOpt (AWQ)")}


@dataclass
class Row:
    precision: str
    method: str
    report: object = None      # mixbuild.validate.result.Report
    seconds: float = 0.0       # quantization (ModelOpt: mtq.quantize; mixbuild: the export)
    error: str | None = None


def log(text: str) -> None:
    print(text, flush=True)


def calibration_batch():
    """[N, L] token ids exactly as `mixbuild export` calibrates by default."""
    from mixbuild.model.checkpoint import Checkpoint
    from mixbuild.quant.calibrate import calibration_tokens
    from mixbuild.quant.config import QuantConfig

    return calibration_tokens(Checkpoint(FIXTURE), QuantConfig.parse("int4"))


def modelopt_coverage(model) -> dict[str, int]:
    """Which weights ModelOpt quantizes, counted from the model's enabled, calibrated quantizers."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    count = dict(linears=0, awq_linears=0, experts=0, awq_experts=0,
                 expert_total=2 * model.config.num_hidden_layers * model.config.num_local_experts)
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if isinstance(quantizer, TensorQuantizer) and quantizer.is_enabled:
            count["linears"] += 1
            smooth = getattr(module.input_quantizer, "pre_quant_scale", None)
            count["awq_linears"] += smooth is not None
        if isinstance(module, TensorQuantizer) and ".experts." in name:
            if "weight_quantizers." in name and module.is_enabled and module.amax is not None:
                count["experts"] += 1
            count["awq_experts"] += getattr(module, "pre_quant_scale", None) is not None
    return count


def coverage_note(precision: str, c: dict[str, int]) -> str:
    note = (f"{precision}: ModelOpt quantized {c['linears']} linear layers; experts quantized: "
            f"{'yes' if c['experts'] else 'no'} ({c['experts']} of {c['expert_total']} expert "
            f"weight matrices)")
    if precision == "int4":
        note += (f"; AWQ scales on {c['awq_linears']} of {c['linears']} linear layers and "
                 f"{c['awq_experts']} expert quantizers")
        if c["experts"] and not c["awq_experts"]:
            note += (" (ModelOpt's AWQ search skips the fused experts: their int4 weights are "
                     "round-to-nearest with max calibration, mixbuild's are AWQ + GPTQ, which "
                     "favours mixbuild in this row pair)")
    return note


def modelopt_row(precision: str, tokens, reference, batches, args) -> tuple[Row, dict | None]:
    """mtq.quantize on a fresh fp32 transformers model, then the shared evaluation; a failure
    becomes the row's text instead of numbers."""
    import torch

    cfg_name, method = MODELOPT_CONFIGS[precision]
    row, coverage = Row(precision, method), None
    try:
        import modelopt.torch.quantization as mtq

        from mixbuild.validate.hf_runner import HFRunner

        runner = HFRunner(FIXTURE, router_logits=True)

        def forward_loop(model):
            with torch.no_grad():
                for start in range(0, tokens.shape[0], args.calib_batch):
                    model(input_ids=tokens[start:start + args.calib_batch])

        start = time.perf_counter()
        mtq.quantize(runner.model, getattr(mtq, cfg_name), forward_loop)
        row.seconds = time.perf_counter() - start
        coverage = modelopt_coverage(runner.model)
        log(f"  {coverage_note(precision, coverage)}")
        evaluate(row, runner, reference, batches, args)
    except Exception as exc:  # report it, never invent numbers
        row.error = "not runnable on CPU: " + traceback.format_exception_only(exc)[-1].strip()
        log(f"  {row.error}")
    return row, coverage


def mixbuild_row(precision: str, work: Path, reference, batches, args) -> Row:
    from mixbuild.exporter.export import export_checkpoint
    from mixbuild.quant.config import QuantConfig
    from mixbuild.runtime.ort_runner import OrtRunner

    out = work / f"mixbuild-{precision}"
    start = time.perf_counter()
    export_checkpoint(FIXTURE, out, dtype="fp32", layout="concat", debug_outputs=True, overwrite=True,
                      quant=QuantConfig.parse(precision), progress=False)
    row = Row(precision, "mixbuild (AWQ + GPTQ)" if precision == "int4" else "mixbuild",
              seconds=time.perf_counter() - start)
    evaluate(row, OrtRunner(out, threads=args.threads, spinning=False), reference, batches, args)
    return row


def evaluate(row: Row, runner, reference, batches, args) -> None:
    import numpy as np

    from mixbuild.validate.compare import validate
    from mixbuild.validate.tolerances import load_tolerances

    row.report = validate(reference, runner, reference.spec, batches, args.steps,
                          load_tolerances(row.precision),
                          artifact_kv_dtype=getattr(runner, "kv_dtype", np.float32))
    m = row.report.metrics
    log(f"  {row.method} {row.precision}: top-1 {m.top1_agreement:.4f}, "
        f"ppl {m.ppl_rel_delta * 100:+.3f}%, KL {m.kl_mean:.5f}")


def gate(report) -> str:
    failed = [c.name for c in report.checks if not c.passed]
    return f"fail: {', '.join(failed)}" if failed else "pass"


def render(rows: list[Row]) -> str:
    lines = ["| precision | method | top-1 agreement | ppl delta vs fp32 | mean KL | "
             "router flips (mean / worst layer) | greedy match | validate thresholds | "
             "quantize s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.report is None:
            lines.append(f"| {row.precision} | {row.method} | {row.error} | | | | | | |")
            continue
        m = row.report.metrics
        flips = (f"{m.router_flip_rate_mean * 100:.2f}% / {m.router_flip_rate * 100:.2f}%"
                 if m.router_flip_rate is not None else "n/a")
        greedy = f"{m.greedy_match_fraction:.3f}" if m.greedy_match_fraction is not None else "n/a"
        lines.append(f"| {row.precision} | {row.method} | {m.top1_agreement:.4f} | "
                     f"{m.ppl_rel_delta * 100:+.3f}% | {m.kl_mean:.5f} | {flips} | {greedy} | "
                     f"{gate(row.report)} | {row.seconds:.1f} |")
    return "\n".join(lines)


def verdict(rows: list[Row]) -> str:
    ours = next(r for r in rows if r.precision == "int4" and r.method.startswith("mixbuild"))
    theirs = next(r for r in rows if r.precision == "int4" and r.method.startswith("ModelOpt"))
    if ours.report is None or theirs.report is None:
        return "verdict: int4 cannot be compared (a side did not run)"
    a, b = ours.report.metrics, theirs.report.metrics
    ppl_ok = abs(a.ppl_rel_delta) <= abs(b.ppl_rel_delta)
    top1_ok = a.top1_agreement >= b.top1_agreement
    ok = ppl_ok and top1_ok
    return (f"verdict: {'PASS' if ok else 'FAIL'}: mixbuild int4 is {'' if ok else 'not '}at "
            f"least as accurate as ModelOpt int4 (|ppl delta| {abs(a.ppl_rel_delta) * 100:.3f}% vs "
            f"{abs(b.ppl_rel_delta) * 100:.3f}%: {'ok' if ppl_ok else 'worse'}; top-1 "
            f"{a.top1_agreement:.4f} vs {b.top1_agreement:.4f}: {'ok' if top1_ok else 'worse'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads.")
    parser.add_argument("--steps", type=int, default=16, help="Greedy tokens per sequence.")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="Tokens per evaluation sequence.")
    parser.add_argument("--max-sequences", type=int, default=8)
    parser.add_argument("--calib-batch", type=int, default=4,
                        help="Calibration sequences per ModelOpt forward pass.")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Keep the exported artifacts here (default: a temporary directory).")
    args = parser.parse_args()

    import torch

    try:
        import modelopt
    except ImportError:
        sys.exit("this benchmark needs NVIDIA ModelOpt: pip install -e '.[bench]'")

    from mixbuild.validate.data import evaluation_batches
    from mixbuild.validate.hf_runner import HFRunner

    begin = time.perf_counter()
    torch.set_num_threads(args.threads)
    reference = HFRunner(FIXTURE, router_logits=True)
    batches = evaluation_batches(FIXTURE, max_tokens=args.max_tokens, batch_size=4,
                                 bos_id=reference.spec.bos_token_id,
                                 max_sequences=args.max_sequences)
    tokens = calibration_batch()
    sequences = sum(b.input_ids.shape[0] for b in batches)
    log(f"calibration: {tokens.shape[0]} x {tokens.shape[1]} tokens; evaluation: {sequences} "
        f"sequences, {sum(b.tokens for b in batches)} tokens")
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        for precision in ("fp8", "int4"):
            log(f"[{precision}] ModelOpt {MODELOPT_CONFIGS[precision][0]}: calibrating, evaluating")
            row, coverage = modelopt_row(precision, tokens, reference, batches, args)
            rows.append(row)
            if coverage is not None:
                notes.append(coverage_note(precision, coverage))
                if not coverage["experts"]:
                    notes.append(f"{precision}: ModelOpt left the experts unquantized: that row's "
                                 "comparison favours ModelOpt.")
            log(f"[{precision}] mixbuild: exporting (calibration, quantization), evaluating")
            rows.append(mixbuild_row(precision, work, reference, batches, args))
    m = next(r.report.metrics for r in rows if r.report is not None)
    print(f"\nModelOpt {modelopt.__version__}, torch {torch.__version__}, CPU, "
          f"threads={args.threads}; "
          f"fp32 transformers reference perplexity {m.ppl_reference:.3f} over {m.positions} "
          f"positions ({m.sequences} sequences), {args.steps} greedy steps\n")
    print(render(rows))
    print()
    for note in notes + [QUANTIZE_TIME_NOTE]:
        print(f"- {note}")
    print(f"\n{verdict(rows)}")
    print(f"runtime {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
