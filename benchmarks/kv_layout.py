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
  call for N+1 tokens - time for 1 token) / N, after a prompt of each context length;
- llama.cpp's decode at batch 1 (llama-cpp-python in the bench-only venv that
  `python benchmarks/serving.py --setup --servers llama` builds, on the checkpoint converted to
  GGUF f32 by llama.cpp's own converter): the context is evaluated once, then --new-tokens
  single-token `eval` calls are timed, the cache cut back to the context before each repeat
  (llama-cpp-python's `n_tokens`; its eval drops the cache past it), and its 1024-token
  prefill. `--no-llama` leaves it out.

The serving cache capacity is 2048 positions (it holds 1900 + the new tokens), as is
llama.cpp's n_ctx. Each figure is the median of --repeats; the engines alternate for --rounds
rounds and each keeps its best. Prints a Markdown table, the issue's goals as met / not met,
and writes kv_layout.png (decode tokens/s against context). Checkpoints, artifacts and GGUF
files are kept in --workdir (default benchmarks/.venvs/work, shared with the other
benchmarks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
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


def child_llama(args) -> dict:
    """(Runs in the llama venv.) llama.cpp's batch-1 decode after each context, and its
    prefill of PREFILL tokens."""
    from llama_cpp import Llama

    options = dict(model_path=str(args.artifact), n_ctx=CAPACITY, n_batch=512, seed=0,
                   n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    try:   # quantized GGUFs have crashed in llama_decode with the extra buffer types on
        llm = Llama(**options, use_extra_bufts=False)
    except TypeError:
        llm = Llama(**options)
    out = {"decode": {}, "prefill_s": None}
    for context in LENGTHS:
        llm.reset()
        llm.eval([7] * context)

        def run(context=context):
            llm.n_tokens = context           # eval drops the cache past n_tokens
            for _ in range(args.new_tokens):
                llm.eval([7])
        out["decode"][f"{context}x1"] = args.new_tokens / _median_time(run, args.repeats)

    def prefill():
        llm.reset()
        llm.eval([7] * PREFILL)
    out["prefill_s"] = _median_time(prefill, args.repeats)
    return out


def child(args) -> None:
    """One layout (or a peer) on one model: print one JSON line of measurements."""
    import numpy as np

    if args.child == "llama":
        print(json.dumps(child_llama(args)))
        return
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
    import serving

    python = serving.venv_python("llama") if kind == "llama" else sys.executable
    cmd = [str(python), __file__, "--child", kind, "--checkpoint", str(checkpoint),
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
    import serving

    from mixbuild.exporter.export import export_checkpoint

    artifacts = {}
    for kind, options in (("concat", {"layout": "concat"}), ("serving", {"layout": "serving"}),
                          ("serving-all", {"layout": "serving", "all_logits": True})):
        path = work / f"{name}-{kind}"
        if not path.is_dir():
            export_checkpoint(checkpoint, path, progress=False, **options)
        artifacts[kind] = path
    artifacts["serving-std"] = artifacts["serving"]
    if args.llama:
        serving.add_tokenizer(checkpoint)     # the GGUF converter needs one
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        artifacts["llama"] = serving.gguf_file(name, checkpoint, work, logs / f"gguf-{name}.log")
    runs = {kind: [] for kind in (*artifacts, "transformers")}
    for _ in range(args.rounds):
        for kind in runs:
            runs[kind].append(run_child(kind, checkpoint, artifacts.get(kind), args))
    print(f"  {name}: measured", flush=True)
    return {kind: best(r) for kind, r in runs.items()}


def render(results: dict) -> str:
    lines = ["| model | batch | context | concat tok/s | serving tok/s | serving / concat | "
             "serving-std tok/s | transformers tok/s | llama.cpp tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for batch in BATCHES:
            for context in LENGTHS:
                key = f"{context}x{batch}"
                c, s = r["concat"]["decode"][key], r["serving"]["decode"][key]
                hf = r["transformers"]["decode"].get(key)
                llama = r.get("llama", {}).get("decode", {}).get(key)
                std = r["serving-std"]["decode"][key]
                lines.append(f"| {name} | {batch} | {context} | {c:.1f} | {s:.1f} | {s / c:.2f}x | "
                             f"{std:.1f} | {f'{hf:.1f}' if hf else '—'} | "
                             f"{f'{llama:.1f}' if llama else '—'} |")
    lines += ["", "| model | decode at 1900 / at 16, batch 1: concat | serving | transformers | "
              f"llama.cpp | prefill {PREFILL} tokens: concat (all logits) | serving last-token | "
              "serving all logits | all / last | llama.cpp |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rel = relative(r)
        p = {k: r[k]["prefill_s"] for k in ("concat", "serving", "serving-all")}
        llama = r.get("llama", {}).get("prefill_s")
        lines.append(f"| {name} | {rel['concat']:.2f}x | {rel['serving']:.2f}x | "
                     f"{rel['transformers']:.2f}x | {_x(rel.get('llama'))} | "
                     f"{p['concat'] * 1e3:.0f} ms | {p['serving'] * 1e3:.0f} ms | "
                     f"{p['serving-all'] * 1e3:.0f} ms | {p['serving-all'] / p['serving']:.2f}x | "
                     f"{f'{llama * 1e3:.0f} ms' if llama else '—'} |")
    return "\n".join(lines)


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "—"


def relative(r: dict) -> dict[str, float]:
    """Batch-1 decode at 1900 tokens of context relative to 16, per engine."""
    return {k: r[k]["decode"]["1900x1"] / r[k]["decode"]["16x1"]
            for k in ("concat", "serving", "transformers", "llama") if k in r}


# the goals: model -> (minimum relative decode of the serving layout at 1900 / 16, whether it
# must also be ahead of the peers' relative decode)
GOAL_RELATIVE = {"random-338M": (0.93, True), "fixture": (0.55, False)}


def goals(results: dict) -> list[str]:
    """Each goal of the benchmark as a 'met' / 'NOT met' line, with the numbers."""
    lines = []
    for name, r in results.items():
        rel = relative(r)
        peers = {k: v for k, v in rel.items() if k in ("transformers", "llama")}
        need, ahead = GOAL_RELATIVE.get(name, (None, False))
        if need is not None:
            ok = rel["serving"] >= need and (not ahead or all(rel["serving"] >= v
                                                              for v in peers.values()))
            against = ", ".join(f"{k} {v:.2f}x" for k, v in peers.items())
            lines.append(f"{name}: serving decode at 1900 / 16 = {rel['serving']:.2f}x (goal >= "
                         f"{need}x{' and ahead of ' if ahead else '; peers: '}{against}): "
                         f"{'met' if ok else 'NOT met'}")
        slower = [f"batch {key.split('x')[1]} at {key.split('x')[0]}: "
                  f"{r['serving']['decode'][key] / r['concat']['decode'][key]:.2f}x"
                  for key in r["concat"]["decode"] if int(key.split("x")[0]) >= 256
                  and r["serving"]["decode"][key] <= r["concat"]["decode"][key]]
        lines.append(f"{name}: serving faster than concat at every context >= 256: "
                     + ("met" if not slower else "NOT met (" + "; ".join(slower) + ")"))
        if name == "random-338M":
            p = r["serving-all"]["prefill_s"] / r["serving"]["prefill_s"]
            lines.append(f"{name}: prefill of {PREFILL} tokens, last-token logits {p:.2f}x faster than "
                         f"all-position (goal >= 1.2x): {'met' if p >= 1.2 else 'NOT met'}")
    return lines


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
        if "llama" in r:
            ax.plot(LENGTHS, [r["llama"]["decode"][f"{c}x1"] for c in LENGTHS], ":",
                    marker="^", label="llama.cpp, batch 1")
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
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".venvs" / "work",
                        help="Keep the checkpoints, artifacts and GGUF files here.")
    parser.add_argument("--no-llama", dest="llama", action="store_false",
                        help="Leave llama.cpp out (it needs benchmarks/serving.py --setup --servers "
                             "llama).")
    parser.add_argument("--png", type=Path, default=Path("kv_layout.png"))
    parser.add_argument("--child", choices=["concat", "serving", "serving-std", "serving-all",
                                            "transformers", "llama"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from generation import bench_models

    if args.llama:
        import serving

        serving.ensure_peer("llama", allow_setup=False, logs=args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {name: measure_model(name, ckpt, args.workdir, args)
               for name, ckpt in bench_models(args.workdir, args.skip_large)}
    print(f"\nthreads={args.threads}, fp32, ONNX Runtime CPU, {args.new_tokens} decode steps, "
          f"serving capacity {CAPACITY}, median of {args.repeats}, best of {args.rounds} rounds\n")
    print(render(results))
    print("\n" + "\n".join(goals(results)))
    plot(results, args.png)
    args.png.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"\nplot: {args.png}; numbers: {args.png.with_suffix('.json')}")


if __name__ == "__main__":
    main()
