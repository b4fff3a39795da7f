"""Export peak memory and wall time: mixbuild's streamed export vs torch.onnx.export of the
same model loaded in transformers, in one run.

    python benchmarks/export_memory.py --layers 8 --hidden 2048 --intermediate 7168 --out /tmp/bench

It writes a random Mixtral-shaped bf16 checkpoint (sharded, like a real download), then runs
each exporter in its own subprocess and reads the child's peak RSS (ru_maxrss). Sizes in the
table are relative to the checkpoint size, so the claim is 'bounded by one layer, not the model'.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD_MIXBUILD = """
import sys
from mixbuild.exporter.export import export_checkpoint
export_checkpoint(sys.argv[1], sys.argv[2], dtype="bf16", progress=False)
"""

CHILD_TRANSFORMERS = """
import sys, torch
from transformers import MixtralForCausalLM
import pathlib
pathlib.Path(sys.argv[2]).mkdir(parents=True)
model = MixtralForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16,
                                           experts_implementation="eager").eval()
model.config.use_cache = False  # the baseline exports prefill only (no KV cache I/O)
ids = torch.ones(1, 8, dtype=torch.long)
try:  # the dynamo exporter first; transformers' MoE loop is data-dependent and may defeat it
    torch.onnx.export(model, (ids,), sys.argv[2] + "/model.onnx", dynamo=True,
                      external_data=True,
                      dynamic_shapes=({0: torch.export.Dim("b"), 1: torch.export.Dim("s")},))
    print("EXPORTER dynamo", file=sys.stderr)
except Exception:
    torch.onnx.export(model, (ids,), sys.argv[2] + "/model.onnx", dynamo=False,
                      input_names=["input_ids"], dynamic_axes={"input_ids": {0: "b", 1: "s"}})
    print("EXPORTER torchscript", file=sys.stderr)
"""


def make_checkpoint(path: Path, layers: int, hidden: int, intermediate: int, experts: int) -> int:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=hidden // 128,
                           num_key_value_heads=min(8, hidden // 128), head_dim=128, num_local_experts=experts,
                           num_experts_per_tok=2, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="2GB")
    return sum(p.numel() for p in model.parameters())


def run_child(code: str, checkpoint: Path, out: Path) -> dict:
    """Run one exporter in a fresh interpreter; it reports its own peak RSS, even on failure."""
    body = "\n".join("    " + line for line in code.strip().splitlines())
    wrapped = (f"import resource, sys\ntry:\n{body}\nfinally:\n    print('MAXRSS_KIB', "
               "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapped, str(checkpoint), str(out)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    marks = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KIB")]
    peak_kib = int(marks[-1]) if marks else 0
    ok = proc.returncode == 0
    used = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("EXPORTER")]
    return {"ok": ok, "wall_s": wall, "exporter": used[-1] if used else "", "peak_rss_gib": peak_kib / 2**20,
            "error": "" if ok else _last_error(proc.stderr)}


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line and not line.startswith("MAXRSS_KIB")]
    errors = [line for line in lines if "Error" in line]
    return (errors or lines or ["?"])[-1][:200]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    from mixbuild.model.spec import MixtralSpec

    ckpt = args.out / "checkpoint"
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt, args.layers, args.hidden, args.intermediate, args.experts)
    params = MixtralSpec.from_file(ckpt / "config.json").param_counts()["total"]
    ckpt_gib = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30
    rows = [("mixbuild export (streamed)", run_child(CHILD_MIXBUILD, ckpt, args.out / "mixbuild"))]
    rows.append(("transformers + torch.onnx.export", run_child(CHILD_TRANSFORMERS, ckpt,
                                                                args.out / "transformers")))
    print(f"\ncheckpoint: {params / 1e9:.2f}B parameters, {ckpt_gib:.2f} GiB bf16 on disk "
          f"({args.layers} layers, H={args.hidden}, I={args.intermediate}, E={args.experts})\n")
    base = rows[0][1]
    print(f"{'exporter':36} {'ok':>3} {'wall s':>8} {'peak RSS GiB':>13} {'RSS / ckpt':>10} "
          f"{'wall vs mixbuild':>16}")
    for name, r in rows:
        print(f"{name:36} {'yes' if r['ok'] else 'no':>3} {r['wall_s']:8.1f} {r['peak_rss_gib']:13.2f} "
              f"{r['peak_rss_gib'] / ckpt_gib:10.2f} {r['wall_s'] / base['wall_s']:16.2f}")
        if r["exporter"]:
            print(f"    via the {r['exporter']} exporter")
        if r["error"]:
            print(f"    error: {r['error']}")
    if not args.keep:
        shutil.rmtree(args.out / "mixbuild", ignore_errors=True)
        shutil.rmtree(args.out / "transformers", ignore_errors=True)


if __name__ == "__main__":
    main()
