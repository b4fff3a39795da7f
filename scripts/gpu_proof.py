"""Prove mixbuild's CUDA paths on one GPU in a few minutes, with one prepared command.

    python scripts/gpu_proof.py OUT_DIR [--budget-s 480]     # on the GPU machine
    python scripts/gpu_proof.py OUT_DIR --dry-run            # anywhere: CPU, seconds

Stages (each timed, each caught: a failure is recorded and the next stage runs):
  1 environment          GPU, memory, versions; measured copy bandwidth and dense GEMM rates
  2 kernel_correctness   Triton gate / experts (fp32, bf16, fp8, int4) vs mixbuild's references
                         at Mixtral-8x7B shapes and the odd small shapes of the CPU tests
  3 end_to_end           torch backend on the device: greedy tokens equal the CPU's;
                         `mixbuild validate --backend torch` passes (fp32, bf16); fp8 / int4 reported
  4 kernel_benchmark     expert kernels at M = 1 .. 8192 vs the ceilings and two torch baselines
  5 decode               an 8x7B-shaped FP8 / INT4 decode step (CUDA graphs) vs its memory floor
  6 tuning               kernel configs for this GPU, as JSON in OUT_DIR/configs, with the time left
Writes OUT_DIR/gpu_proof.json (rewritten after every stage), gpu_proof.md and PNGs. Goals are
recorded per stage (met / not met / not measured); missing a performance goal is a result, not
a failure. Exit 0 when every stage passed, 1 when any failed (or was skipped for lack of
time), 2 on a usage error (such as an OUT_DIR that holds files this script did not write).

--dry-run runs the same code on the CPU: Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported), tiny shapes, one timing sample, no fp8 / int4 exports.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("environment", "kernel_correctness", "end_to_end", "kernel_benchmark", "decode",
          "tuning")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="where the results go (new, empty, or an "
                                                   "earlier gpu_proof output)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU only: Triton interpreter, tiny shapes, a few seconds")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="seconds for the whole run; stages left when it is spent are skipped")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    # tests: make one stage raise, to show that the failure is recorded and the rest still runs
    parser.add_argument("--fail-stage", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    return args


def prepare_out_dir(out_dir: Path) -> None:
    """Refuse an OUT_DIR holding anything this script did not write (UsageError); clear the
    files of an earlier gpu_proof run in it."""
    from gpu_proof.report import is_ours, previous_files

    from mixbuild.errors import UsageError

    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"OUT_DIR exists and is not a directory: {out_dir}",
                         hint="choose another OUT_DIR")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        out_dir.mkdir(parents=True, exist_ok=True)
        return
    if not is_ours(out_dir):
        raise UsageError(f"refusing to write into {out_dir}: it holds files gpu_proof did not write",
                         expected="a new or empty directory, or an earlier gpu_proof output "
                                  "(with its gpu_proof.json)",
                         found=", ".join(sorted(p.name for p in out_dir.iterdir())[:6]),
                         hint="choose another OUT_DIR; nothing was changed")
    for name in [*previous_files(out_dir), "gpu_proof.json", "gpu_proof.md"]:
        path = out_dir / name
        if path.is_file() and out_dir.resolve() in path.resolve().parents:
            path.unlink()
    for sub in sorted((p for p in out_dir.rglob("*") if p.is_dir()), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"     # triton reads it when a kernel is defined
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    from mixbuild.errors import MixbuildError

    try:
        prepare_out_dir(args.out_dir)
    except MixbuildError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    return run(args)


def run(args: argparse.Namespace) -> int:
    import torch
    from gpu_proof import core, report

    from mixbuild.progress import progress_bar

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible to torch\n  fix:      run on the GPU machine, or "
              "pass --dry-run to run the same code on the CPU", file=sys.stderr)
        return 2
    ctx = core.Context(core.profile(dry), args.out_dir, core.Clock(args.budget_s),
                       fail_stage=args.fail_stage)
    doc = {"schema": report.SCHEMA, "version": 1, "dry_run": dry, "budget_s": args.budget_s,
           "started": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join(["python", "scripts/gpu_proof.py", *sys.argv[1:]]),
           "environment": {"torch": torch.__version__, "python": sys.version.split()[0]},
           "stages": [], "passed": False, "files": []}
    start = time.monotonic()
    with progress_bar("gpu proof", len(STAGES), enabled=not args.no_progress) as advance:
        for name in STAGES:
            advance(0, f"{name} (stage {len(doc['stages']) + 1}/{len(STAGES)})")
            record = core.run_stage(name, stage_function(name), ctx)
            doc["stages"].append(record)
            if name == "environment" and "environment" in record:
                doc["environment"].update(record["environment"])
            print(f"{name}: {status(record)} in {record['seconds']:.1f} s", file=sys.stderr)
            advance(1)
            finish(doc, ctx, time.monotonic() - start, plots=False)
    finish(doc, ctx, time.monotonic() - start, plots=True)
    print(f"{'PASSED' if doc['passed'] else 'FAILED'}: {args.out_dir / report.MD_FILE}",
          file=sys.stderr)
    return 0 if doc["passed"] else 1


def stage_function(name: str):
    from gpu_proof import bench, decode, end_to_end, environment, kernels, tuning

    return {"environment": environment.environment_stage,
            "kernel_correctness": kernels.correctness_stage,
            "end_to_end": end_to_end.end_to_end_stage, "kernel_benchmark": bench.bench_stage,
            "decode": decode.decode_stage, "tuning": tuning.tuning_stage}[name]


def status(record: dict) -> str:
    if record.get("skipped"):
        return record["skipped"]
    if record["passed"]:
        return "passed"
    return f"FAILED ({record.get('error', 'a check failed').splitlines()[0][:100]})"


def finish(doc: dict, ctx, seconds: float, plots: bool) -> None:
    """Rewrite gpu_proof.json and gpu_proof.md (and, at the end, the plots)."""
    from gpu_proof import report

    doc["seconds"] = round(seconds, 2)
    doc["ceilings"] = dict(ctx.ceilings)
    doc["passed"] = len(doc["stages"]) == len(STAGES) and all(s["passed"] for s in doc["stages"])
    if plots:
        try:
            doc["plots"] = report.plots(doc, ctx.out_dir)
        except Exception as exc:          # a plot must never cost the results
            doc["plots"], doc["plot_error"] = [], f"{type(exc).__name__}: {exc}"
    doc["files"] = sorted({*ctx.files, *doc.get("plots", []), report.MD_FILE})
    report.write_text(ctx.out_dir / report.JSON_FILE, report.document(doc))
    report.write_text(ctx.out_dir / report.MD_FILE, report.markdown(doc))


if __name__ == "__main__":
    sys.exit(main())
