"""KV-cache layouts side by side: concat (past in, present out) vs serving (a fixed-capacity
cache updated in place), on ONNX Runtime CPU, in one run.

    python benchmarks/kv_layout.py --threads 2            # fixture + random 338M model
    python benchmarks/kv_layout.py --threads 2 --skip-large

For each model (the trained fixture, then the random Mixtral-shaped model of
benchmarks/generation.py) both layouts are exported from the same checkpoint, and each layout
is measured in its own child process (ONNX Runtime thread pools of two sessions in one process
slow each other down):

- decode tokens/s at batch 1 and 8 with 16, 256, 1024 and 1900 tokens of context: --new-tokens
  greedy-shaped decode steps (one token per row per step) through the runtime's own step
  classes (FeedStep for concat, ServingStep for serving), timed from a cache that already
  holds the context (random values: speed does not depend on them), so the figure is the
  decode cost alone, not the prefill's. "serving" is what the runtime runs (the attention as
  ONNX Runtime's GroupQueryAttention, mixbuild/runtime/ort_attention.py); "serving-std" runs the
  artifact's standard TensorScatter + Attention graph unchanged;
- prefill time of one 1024-token prompt: concat (logits of every position, the only choice
  there), serving with last-token logits, and serving exported with --all-logits;
- transformers' decode at batch 1 on the same checkpoint as the peer: (time of a generate()
  call for N+1 tokens - time for 1 token) / N, after a prompt of each context length.

The serving cache capacity is 2048 positions (it holds 1900 + the new tokens). Each figure is
the median of --repeats; the layouts alternate for --rounds rounds and each keeps its best.
Prints a Markdown table and writes kv_layout.png (decode tokens/s against context).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

LENGTHS = (16, 256, 1024, 1900)
BATCHES = (1, 8)
CAPACITY = 2048
PREFILL = 1024


def _median_time(fn, repeats: int) -> float:
    fn()   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def concat_decode(runner, spec, batch: int, context: int, steps: int):
    """A callable running `steps` decode steps of the concat layout from `context` positions."""
    import numpy as np

    from mixbuild.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, kv_inputs, kv_pairs

    rng = np.random.default_rng(0)
    past = {name: rng.standard_normal((batch, spec.num_kv_heads, context, spec.head_dim),
                                      dtype=np.float32) for name in kv_inputs(spec.num_layers)}

    def run():
        feeds = dict(past)
        for t in range(steps):
            feeds[INPUT_IDS] = np.full((batch, 1), 7, np.int64)
            feeds[ATTENTION_MASK] = np.ones((batch, context + t + 1), np.int64)
            feeds[POSITION_IDS] = np.full((batch, 1), context + t, np.int64)
            out = runner.infer(feeds)
            feeds.update({p: out[q] for p, q in kv_pairs(spec.num_layers)})
    return run


def serving_decode(step, batch: int, context: int, steps: int):
    import numpy as np

    cache = step.new_cache()
    cache.reset(batch, CAPACITY)
    rng = np.random.default_rng(0)
    for buffer in cache.buffers:
        buffer[...] = rng.standard_normal(buffer.shape, dtype=np.float32)
    ones = np.ones(batch, np.int64)

    def run():
        cache.lengths[:batch] = context
        for t in range(steps):
            step.run(np.full((batch, 1), 7, np.int64), np.full((batch, 1), context + t, np.int64),
                     ones, cache)
    return run


def child(args) -> None:
    """One layout (or transformers) on one model: print one JSON line of measurements."""
    import numpy as np

    out = {"decode": {}, "prefill_s": {}}
    if args.child == "transformers":
        import torch
        from transformers import MixtralForCausalLM

        torch.set_num_threads(args.threads)
        hf = MixtralForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None
        for context in LENGTHS:
            ids = torch.full((1, context), 7)

            def gen(n, ids=ids):
                with torch.inference_mode():
                    hf.generate(input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
            one = _median_time(lambda: gen(1), args.repeats)
            many = _median_time(lambda: gen(args.new_tokens + 1), args.repeats)
            out["decode"][f"{context}x1"] = args.new_tokens / (many - one)
        print(json.dumps(out))
        return

    from mixbuild.runtime.ort_runner import OrtRunner
    from mixbuild.runtime.steps import ServingStep

    runner = OrtRunner(args.artifact, threads=args.threads,
                       fast_attention=args.child != "serving-std")
    spec = runner.spec
    serving = args.child.startswith("serving")
    step = ServingStep(runner, CAPACITY, max(BATCHES)) if serving else None
    if args.child != "serving-all":
        for context in LENGTHS:
            for batch in BATCHES:
                run = (serving_decode(step, batch, context, args.new_tokens) if serving
                       else concat_decode(runner, spec, batch, context, args.new_tokens))
                seconds = _median_time(run, args.repeats)
                out["decode"][f"{context}x{batch}"] = batch * args.new_tokens / seconds
    ids = np.full((1, PREFILL), 7, np.int64)
    positions = np.arange(PREFILL, dtype=np.int64)[None]
    if serving:
        cache = step.new_cache()
        cache.reset(1, CAPACITY)

        def prefill():
            cache.lengths[:1] = 0
            if args.child == "serving-all":   # ServingStep binds [B, V] logits: run the session
                from mixbuild.contract import CACHE_LENGTHS, INPUT_IDS, INPUT_LENGTHS, POSITION_IDS
                feeds = {INPUT_IDS: ids, POSITION_IDS: positions, CACHE_LENGTHS: np.zeros(1, np.int64),
                         INPUT_LENGTHS: np.array([PREFILL])}
                feeds.update({n: b[:1] for (n, _), b in zip(cache.names, cache.buffers)})
                runner.session.run(None, feeds)
            else:
                step.run(ids, positions, np.array([PREFILL]), cache)
    else:
        from mixbuild.runtime.runner import prefill_feeds

        feeds = prefill_feeds(spec, ids, np.ones_like(ids))

        def prefill():
            runner.infer(feeds)
    out["prefill_s"] = _median_time(prefill, args.repeats)
    print(json.dumps(out))


def run_child(kind: str, checkpoint: Path, artifact: Path | None, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--checkpoint", str(checkpoint),
           "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats)]
    if artifact is not None:
        cmd += ["--artifact", str(artifact)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{kind} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best(runs: list[dict]) -> dict:
    decode = {k: max(r["decode"][k] for r in runs) for k in runs[0]["decode"]}
    prefill = min(r["prefill_s"] for r in runs) if runs[0]["prefill_s"] else None
    return {"decode": decode, "prefill_s": prefill}


def measure_model(name: str, checkpoint: Path, work: Path, args) -> dict:
    from mixbuild.exporter.export import export_checkpoint

    artifacts = {}
    for kind, options in (("concat", {"layout": "concat"}), ("serving", {"layout": "serving"}),
                          ("serving-all", {"layout": "serving", "all_logits": True})):
        path = work / f"{name}-{kind}"
        if not path.is_dir():
            export_checkpoint(checkpoint, path, progress=False, **options)
        artifacts[kind] = path
    artifacts["serving-std"] = artifacts["serving"]
    runs = {kind: [] for kind in (*artifacts, "transformers")}
    for _ in range(args.rounds):
        for kind in runs:
            runs[kind].append(run_child(kind, checkpoint, artifacts.get(kind), args))
    print(f"  {name}: measured", flush=True)
    return {kind: best(r) for kind, r in runs.items()}


def render(results: dict) -> str:
    lines = ["| model | batch | context | concat tok/s | serving tok/s | serving / concat | "
             "serving-std tok/s | transformers tok/s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for batch in BATCHES:
            for context in LENGTHS:
                key = f"{context}x{batch}"
                c, s = r["concat"]["decode"][key], r["serving"]["decode"][key]
                hf = r["transformers"]["decode"].get(key)
                std = r["serving-std"]["decode"][key]
                lines.append(f"| {name} | {batch} | {context} | {c:.1f} | {s:.1f} | {s / c:.2f}x | "
                             f"{std:.1f} | {f'{hf:.1f}' if hf else '—'} |")
    lines += ["", "| model | decode at 1900 / at 16, batch 1: concat | serving | transformers | "
              f"prefill {PREFILL} tokens: concat (all logits) | serving last-token | serving "
              "all logits | all / last |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rel = {k: r[k]["decode"]["1900x1"] / r[k]["decode"]["16x1"]
               for k in ("concat", "serving", "transformers")}
        p = {k: r[k]["prefill_s"] for k in ("concat", "serving", "serving-all")}
        lines.append(f"| {name} | {rel['concat']:.2f}x | {rel['serving']:.2f}x | "
                     f"{rel['transformers']:.2f}x | {p['concat'] * 1e3:.0f} ms | "
                     f"{p['serving'] * 1e3:.0f} ms | {p['serving-all'] * 1e3:.0f} ms | "
                     f"{p['serving-all'] / p['serving']:.2f}x |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(results), 4))
    FigureCanvasAgg(fig)
    for i, (name, r) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), i + 1)
        for kind, style in (("concat", "--"), ("serving", "-"), ("serving-std", "-.")):
            for batch in BATCHES:
                ax.plot(LENGTHS, [r[kind]["decode"][f"{c}x{batch}"] for c in LENGTHS], style,
                        marker="o", label=f"{kind}, batch {batch}")
        ax.plot(LENGTHS, [r["transformers"]["decode"][f"{c}x1"] for c in LENGTHS], ":",
                marker="s", label="transformers, batch 1")
        ax.set(title=name, xlabel="context (tokens)", ylabel="decode tokens/s", xscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-large", action="store_true", help="Only the trained fixture.")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Keep the checkpoints and artifacts here (default: a temporary dir).")
    parser.add_argument("--png", type=Path, default=Path("kv_layout.png"))
    parser.add_argument("--child", choices=["concat", "serving", "serving-std", "serving-all",
                                            "transformers"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from generation import bench_models

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {name: measure_model(name, ckpt, work, args)
                   for name, ckpt in bench_models(work, args.skip_large)}
    print(f"\nthreads={args.threads}, fp32, ONNX Runtime CPU, {args.new_tokens} decode steps, "
          f"serving capacity {CAPACITY}, median of {args.repeats}, best of {args.rounds} rounds\n")
    print(render(results))
    plot(results, args.png)
    print(f"\nplot: {args.png}")


if __name__ == "__main__":
    main()
