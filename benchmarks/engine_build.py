"""Engine build times: TensorRT-RTX ahead-of-time builds of the trained fixture, in one run.

    python benchmarks/engine_build.py --compute-capability 8.9 --opt-levels 0,3
    python benchmarks/engine_build.py --artifact path/to/artifact --opt-levels 3

Without --artifact the trained fixture is exported as fp16, int4 and fp8 into a temporary
directory first (export time is not counted). Each artifact is built with --moe plugin at every
optimisation level; the table shows the whole `build_engine` wall time (preflight, build
process start, parse, build, hashing, engine.json), the builder's own time, and the plan size.
Build times are CPU-bound here (no GPU is used by an ahead-of-time TensorRT-RTX build).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIXTURE = ROOT / "mixbuild" / "fixtures" / "tiny-code"


def export_fixture(root: Path) -> dict[str, Path]:
    from mixbuild.exporter.export import export_checkpoint
    from mixbuild.quant.config import QuantConfig

    calib = {"calib_tokens": 256, "calib_seq_len": 64}
    quant = {"fp16": None, "int4": QuantConfig.parse("int4", **calib),
             "fp8": QuantConfig.parse("fp8", **calib)}
    return {name: export_checkpoint(FIXTURE, root / name, dtype="fp16", quant=q, progress=False)
            for name, q in quant.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", action="append", type=Path, default=[])
    parser.add_argument("--compute-capability", default="8.9")
    parser.add_argument("--opt-levels", default="0,3")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-step-tokens", type=int, default=512)
    parser.add_argument("--max-context", type=int, default=2048)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from mixbuild.builder import build_engine
    from mixbuild.progress import human_bytes

    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        root = Path(tmp)
        artifacts = ({p.name: p for p in args.artifact} if args.artifact
                     else export_fixture(root / "artifacts"))
        table = Table("artifact", "opt level", "wall s", "builder s", "plan",
                      title=f"TensorRT-RTX builds for SM {args.compute_capability} (--moe plugin)")
        for name, artifact in artifacts.items():
            for level in (int(x) for x in args.opt_levels.split(",")):
                out = build_engine(artifact, root / f"{name}-{level}", compute_capability=
                                   args.compute_capability, opt_level=level, progress=False,
                                   max_batch=args.max_batch, max_step_tokens=args.max_step_tokens,
                                   max_context=args.max_context)
                m = json.loads((out / "engine.json").read_text())
                table.add_row(name, str(level), f"{m['build']['wall_s']:.2f}",
                              f"{m['build']['build_s']:.2f}", human_bytes(m["plan"]["bytes"]))
        Console().print(table)


if __name__ == "__main__":
    main()
