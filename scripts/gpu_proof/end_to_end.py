"""Stage 3: the torch backend on the device, end to end, on the trained fixture model.

1. Greedy tokens: mixbuild's reference model in float32 on the device (MoE through the Triton
   kernels on CUDA) must generate the same greedy tokens as on the CPU; bf16 on the device is
   measured against the same tokens and recorded.
2. `mixbuild validate --backend torch --device DEVICE --dtype fp32 | bf16`: must pass.
3. fp8 and int4: exported from the fixture and validated (`--backend ort --device cpu`, the
   only runtime that runs quantized artifacts where no TensorRT is installed); the reports are
   recorded (passed or not), they do not decide the stage. Left out of a dry run (each export
   calibrates for about ten seconds on a small CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gpu_proof.core import SKIPPED_BUDGET, Context, goal

PROMPTS = ("def fibonacci(n):\n", "import os\nimport sys\n\n", "class Parser:\n    def __init__(self",
           "    for key, value in")


def fixture_dir() -> Path:
    from mixbuild.fixtures import __file__ as fixtures

    return Path(fixtures).parent / "tiny-code"


def end_to_end_stage(ctx: Context) -> dict:
    p = ctx.profile
    steps = 8 if p.dry_run else 32
    greedy = greedy_check(p.device, steps)
    validations = []
    for dtype in ("fp32", "bf16"):
        if ctx.clock.expired():
            validations.append({"dtype": dtype, "skipped": SKIPPED_BUDGET})
            continue
        validations.append(run_validate(ctx, fixture_dir(), f"torch-{dtype}", "torch", p.device,
                                        dtype, p.dry_run))
    quantized = quantized_reports(ctx)
    torch_ok = all(v.get("passed") for v in validations)
    return {"passed": greedy["fp32_match"] and torch_ok, "greedy": greedy,
            "validate": validations, "quantized": quantized,
            "goals": [goal("fp32 greedy tokens on the device equal the CPU's", greedy["fp32_match"],
                           f"{greedy['fp32_matching']}/{greedy['tokens']} tokens"),
                      goal("mixbuild validate --backend torch passes (fp32, bf16)", torch_ok)]}


def greedy_check(device: str, steps: int) -> dict:
    import torch

    from mixbuild.runtime.runner import greedy_steps, left_pad
    from mixbuild.runtime.tokenizer import Tokenizer
    from mixbuild.runtime.torch_runner import TorchRunner

    tok = Tokenizer.from_dir(fixture_dir())
    runner_cpu = TorchRunner.from_checkpoint(fixture_dir(), dtype=torch.float32, device="cpu")
    ids, mask = left_pad([tok.encode(p) for p in PROMPTS], pad_id=0)
    spec = runner_cpu.spec

    def tokens(runner):
        out = [o["logits"][:, -1].argmax(-1) for _, o in
               greedy_steps(runner, spec, ids, mask, steps - 1)]
        return np.stack(out, axis=1)

    want = tokens(runner_cpu)
    got32 = tokens(TorchRunner.from_checkpoint(fixture_dir(), dtype=torch.float32, device=device))
    got16 = tokens(TorchRunner.from_checkpoint(fixture_dir(), dtype=torch.bfloat16, device=device))
    return {"device": device, "sequences": len(PROMPTS), "steps": steps, "tokens": int(want.size),
            "fp32_match": bool(np.array_equal(want, got32)),
            "fp32_matching": int(leading_matches(want, got32)),
            "bf16_matching": int(leading_matches(want, got16))}


def leading_matches(a: np.ndarray, b: np.ndarray) -> int:
    """Tokens before each row's first disagreement, summed over rows."""
    same = np.cumprod(a == b, axis=1)
    return int(same.sum())


def run_validate(ctx: Context, model: Path, name: str, backend: str, device: str,
                 dtype: str | None, small: bool) -> dict:
    """`mixbuild validate` in this process; the report goes to OUT_DIR/validate/NAME."""
    from click.testing import CliRunner

    from mixbuild.cli import main

    out = ctx.out_dir / "validate" / name
    args = ["validate", str(model), "--reference", str(fixture_dir()), "--backend", backend,
            "--device", device, "-o", str(out), "--no-plot"]
    args += ["--dtype", dtype] if dtype else []
    # small (the dry run): 512 positions, the fewest at which validate's confidence bounds
    # can certify bf16 (fewer are judged inconclusive); few greedy steps
    args += ["--max-sequences", "4", "--steps", "4", "--max-tokens", "128"] if small else []
    result = CliRunner().invoke(main, args)
    record = {"name": name, "backend": backend, "device": device, "dtype": dtype,
              "exit_code": result.exit_code, "passed": result.exit_code == 0}
    report = out / "report.json"
    if report.is_file():
        doc = json.loads(report.read_text())
        metrics = doc.get("metrics", {})
        record.update(precision=doc.get("precision"), report=f"validate/{name}/report.json",
                      **{k: metrics.get(k) for k in ("top1_agreement", "kl_mean", "ppl_rel_delta",
                                                      "greedy_match_fraction", "logits_max_abs")})
        ctx.files.append(f"validate/{name}/report.json")
        ctx.files.append(f"validate/{name}/report.md")
    else:
        record["output"] = result.output[-1500:]
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            record["error"] = f"{type(result.exception).__name__}: {result.exception}"
    return record


def quantized_reports(ctx: Context) -> list[dict]:
    if ctx.profile.dry_run:
        return [{"precision": p, "skipped": "dry run"} for p in ("fp8", "int4")]
    import tempfile

    from mixbuild.exporter.export import export_checkpoint
    from mixbuild.quant.config import QuantConfig

    records = []
    with tempfile.TemporaryDirectory(prefix="gpu-proof-") as scratch:
        for precision in ("fp8", "int4"):
            if ctx.clock.expired(reserve=20):
                records.append({"precision": precision, "skipped": SKIPPED_BUDGET})
                continue
            try:
                artifact = export_checkpoint(fixture_dir(), Path(scratch) / precision,
                                             quant=QuantConfig.parse(precision), progress=False)
                records.append(run_validate(ctx, artifact, f"ort-{precision}", "ort", "cpu",
                                            None, small=False))
            except Exception as exc:            # recorded: it does not decide the stage
                records.append({"precision": precision,
                                "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    return records
