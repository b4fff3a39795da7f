"""Generation speed on CPU: mixbuild's `ort` backend vs transformers' `generate`, in one run.

    python benchmarks/generation.py --threads 2 --new-tokens 32

For each model (the trained fixture, then a random Mixtral-shaped model of a few hundred
million parameters written with transformers' save_pretrained and exported with mixbuild) and
for batch 1 and batch 8 it measures, with the same prompts, greedy decoding, the same number of
new tokens (end-of-sequence ignored on both sides), fp32 and the same thread count for torch and
ONNX Runtime:

- time to first token: wall time of a call generating one token (prefill + one sample);
- tokens/s: batch x new tokens / wall time of the full call (prefill included).

Each side runs in its own child process: torch's OpenMP pool and ONNX Runtime's pool in one
process slow each other down badly on a small machine (transformers at batch 1 fell from
58 to 5 tokens/s after an ONNX Runtime session had run beside it). Each figure is the median
of --repeats timed runs after one warm-up run; the sides alternate for --rounds rounds and
the best round of each side counts (on a shared machine other processes only slow a round
down). The last column says whether both sides produced
the same tokens (they should: same weights, greedy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIXTURE = ROOT / "mixbuild" / "fixtures" / "tiny-code"
CODE_PROMPTS = [
    "def fibonacci(n):\n", "import os\nimport sys\n\n", "class Parser:\n    def __init__(self",
    "    for key, value in", "# Copyright 2001 Python Software Foundation\n\"\"\"Utilities for",
    "def read(path, encoding='utf-8'):\n    with open(", "if __name__ == '__main__':\n", "try:\n    import",
]
LARGE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=3,
             num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_local_experts=8,
             num_experts_per_tok=2, max_position_embeddings=4096)


@dataclass(frozen=True)
class Measure:
    ttft_s: float
    tokens_per_s: float
    tokens: list[list[int]]


def make_large_checkpoint(out: Path) -> Path:
    """A random Mixtral-shaped model (bf16 on disk, like a download) via save_pretrained."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(**LARGE, dtype="bfloat16")
    model = MixtralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"random Mixtral-shaped model: {params / 1e6:.0f} M parameters -> {out}", flush=True)
    return out


def bench_models(work: Path, skip_large: bool) -> list[tuple[str, Path]]:
    """(name, checkpoint) of the benchmark models: the trained fixture, then (unless skipped)
    the random Mixtral-shaped model, made once in `work`."""
    models = [("fixture", FIXTURE)]
    if not skip_large:
        large = work / "large-ckpt"
        models.append(("random-338M", large if large.is_dir() else make_large_checkpoint(large)))
    return models


def prompts_for(checkpoint: Path, vocab_size: int, count: int) -> list[list[int]]:
    """The fixture's code prompts through its tokenizer; random ids for a model without one."""
    import numpy as np

    from mixbuild.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(checkpoint)
    if tokenizer is not None:
        return [tokenizer.encode(CODE_PROMPTS[i % len(CODE_PROMPTS)]) for i in range(count)]
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab_size, 6 + 3 * i).tolist() for i in range(count)]


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench_mixbuild(model, prompts, new_tokens: int, repeats: int) -> Measure:
    """mixbuild.runtime with its defaults (ONNX Runtime FeedStep, ORT thread spinning on)."""
    def run(n):
        return lambda: model.generate_ids(prompts, max_new_tokens=n, ignore_eos=True)

    ttft, _ = timed(run(1), repeats)
    total, results = timed(run(new_tokens), repeats)
    return Measure(ttft, len(prompts) * new_tokens / total, [r.token_ids for r in results])


def bench_transformers(hf, prompts, new_tokens: int, repeats: int, pad_id: int) -> Measure:
    import torch

    from mixbuild.runtime.runner import left_pad

    ids, mask = (torch.from_numpy(a) for a in left_pad(prompts, pad_id))

    def run(n):
        def call():
            with torch.inference_mode():
                return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                   do_sample=False, pad_token_id=pad_id)
        return call

    ttft, _ = timed(run(1), repeats)
    total, out = timed(run(new_tokens), repeats)
    return Measure(ttft, len(prompts) * new_tokens / total, out[:, ids.shape[1]:].tolist())


def child(args) -> None:
    """Measure one side (mixbuild or transformers) at batch 1 and 8; print one JSON line."""
    import torch

    from mixbuild.model.checkpoint import Checkpoint
    from mixbuild.runtime.sampling import GenerationDefaults

    torch.set_num_threads(args.threads)
    spec = Checkpoint(args.checkpoint).spec
    pad = GenerationDefaults.read(args.checkpoint, spec.eos_token_id).pad_token_id
    if args.child == "mixbuild":
        import mixbuild.runtime as rt

        model = rt.load(args.artifact, threads=args.threads, max_batch=8)
        def measure(prompts):
            return bench_mixbuild(model, prompts, args.new_tokens, args.repeats)
    else:
        from transformers import MixtralForCausalLM

        hf = MixtralForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None  # both sides generate exactly --new-tokens
        def measure(prompts):
            return bench_transformers(hf, prompts, args.new_tokens, args.repeats, pad)
    out = {}
    for batch in (1, 8):
        m = measure(prompts_for(args.checkpoint, spec.vocab_size, batch))
        out[batch] = {"ttft_s": m.ttft_s, "tokens_per_s": m.tokens_per_s, "tokens": m.tokens}
    print(json.dumps(out))


def run_child(side: str, checkpoint: Path, artifact: Path, args) -> dict[int, Measure]:
    cmd = [sys.executable, __file__, "--child", side, "--checkpoint", str(checkpoint),
           "--artifact", str(artifact), "--threads", str(args.threads),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{side} child failed:\n{done.stderr[-3000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return {int(b): Measure(v["ttft_s"], v["tokens_per_s"], v["tokens"]) for b, v in data.items()}


def best(runs: list[dict[int, Measure]], batch: int) -> Measure:
    """The fastest round (other processes only ever slow a round down)."""
    tokens = max(r[batch].tokens_per_s for r in runs)
    ttft = min(r[batch].ttft_s for r in runs)
    return Measure(ttft, tokens, runs[0][batch].tokens)


def compare(name: str, checkpoint: Path, artifact: Path, args) -> list[tuple]:
    ours, theirs = [], []
    for _ in range(args.rounds):  # alternate the sides so both see the same machine load
        ours.append(run_child("mixbuild", checkpoint, artifact, args))
        theirs.append(run_child("transformers", checkpoint, artifact, args))
    print(f"  {name}: measured", flush=True)
    return [(name, b, best(ours, b), best(theirs, b),
             best(ours, b).tokens == best(theirs, b).tokens) for b in (1, 8)]


def render(rows) -> str:
    head = ("| model | batch | mixbuild ort tok/s | transformers tok/s | tok/s ratio | "
            "ort TTFT ms | transformers TTFT ms | TTFT ratio | same tokens |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, batch, ours, theirs, same in rows:
        lines.append(f"| {name} | {batch} | {ours.tokens_per_s:.1f} | {theirs.tokens_per_s:.1f} | "
                     f"{ours.tokens_per_s / theirs.tokens_per_s:.2f}x | {ours.ttft_s * 1e3:.1f} | "
                     f"{theirs.ttft_s * 1e3:.1f} | {theirs.ttft_s / ours.ttft_s:.2f}x | "
                     f"{'yes' if same else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2,
                        help="Child processes per side, alternating; the best round counts.")
    parser.add_argument("--skip-large", action="store_true", help="Only the trained fixture.")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Keep the exported artifacts here (default: a temporary directory).")
    parser.add_argument("--child", choices=["mixbuild", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from mixbuild.exporter.export import export_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        rows = []
        for name, checkpoint in bench_models(work, args.skip_large):
            artifact = work / f"{name}-fp32"
            if not artifact.is_dir():
                export_checkpoint(checkpoint, artifact, dtype="fp32", layout="concat", progress=False)
            rows += compare(name, checkpoint, artifact, args)
    print(f"\nthreads={args.threads} (torch and ONNX Runtime), new tokens={args.new_tokens}, "
          f"greedy, fp32, CPU, median of {args.repeats} runs, best of {args.rounds} "
          f"alternating rounds\n")
    print(render(rows))


if __name__ == "__main__":
    main()
