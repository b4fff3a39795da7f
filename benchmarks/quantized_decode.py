"""Quantized decode on the CPU: mixbuild fp32 / fp8 / int4 on ONNX Runtime against llama.cpp
f32 / Q8_0 / Q4_0, in one run.

    python benchmarks/quantized_decode.py --threads 2                # fixture + random 338M
    python benchmarks/quantized_decode.py --threads 2 --skip-large

For each model (the trained fixture, then the random Mixtral-shaped ~338M-parameter model of
benchmarks/generation.py) the same checkpoint is exported by mixbuild (fp32, fp8 and int4,
concat layout, default quantization settings but --calib-tokens: calibration does not change
speed) and converted by llama.cpp's own converter (f32 and Q8_0 GGUF, then Q4_0 with
llama.cpp's quantizer, llama_model_quantize, from the f32 file). Every engine runs in its own
child process, batch 1, greedy, --new-tokens tokens after a short prompt, end-of-sequence
ignored, --threads threads; the figure is the best of --repeats runs of the decode rate
((tokens - 1) / time from the first to the last token, so the prompt is left out on both
sides), after one warm-up run, and the best of --rounds such children run in turn (the
engines alternate, so a slow spell of the machine does not hit one engine only).

mixbuild's quantized artifacts run on ONNX Runtime's fast kernels as `mixbuild run` and the
runtime load them (int4 experts as QMoE, int4 linears as MatMulNBits at accuracy level 1,
fp8 weights folded to float32 at load; mixbuild/schemes/ort.py), and as "body", the
artifact's own portable function bodies (what every quantized artifact ran before:
dequantize every expert on every call), with fewer tokens (it is slow). int4 also runs at
accuracy level 4 ("A8": int8 activations, `--accuracy-level 4`, the numerics of llama.cpp's
Q4_0 x Q8_0 dot products), and is exported twice more with lm_head quantized (`--lm-head int8`,
`--lm-head int4`): on these small models the float32 lm_head is most of a token's weight
bytes, and llama.cpp's Q4_0 files hold it in Q6_K. The resident memory (peak RSS of the child)
is reported beside the file size: an int4 session should hold about the int4 bytes, the fp8
one holds float32 weights (folded at load).

llama.cpp lives in the bench-only venv of benchmarks/serving.py (`python
benchmarks/serving.py --setup --servers llama` builds it: llama-cpp-python from source,
CPU-only, with the vendored GGUF converter); its GGUF files are kept under
benchmarks/.venvs/work. Prints a Markdown table and writes quantized_decode.json and
quantized_decode.png (decode tok/s per engine and precision) to --out.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT = "def fibonacci(n):\n    "
# label -> (precision, extra export flags, accuracy level or "body")
MIXBUILD = {
    "fp32": ("fp32", (), 1),
    "fp8": ("fp8", (), 1), "fp8 body": ("fp8", (), "body"),
    "int4": ("int4", (), 1), "int4 A8": ("int4", (), 4), "int4 body": ("int4", (), "body"),
    "int4, lm_head int8": ("int4", ("--lm-head", "int8"), 1),
    "int4, lm_head int8, A8": ("int4", ("--lm-head", "int8"), 4),
    "int4, lm_head int4": ("int4", ("--lm-head", "int4"), 1),
    "int4, lm_head int4, A8": ("int4", ("--lm-head", "int4"), 4),
}
LLAMA = ("f32", "q8_0", "q4_0")
LLAMA_FTYPE = {"q4_0": 2}          # llama.h: LLAMA_FTYPE_MOSTLY_Q4_0
BATCH = 8                          # the batched figure (mixbuild only: llama-cpp-python's
                                   # Llama API generates one sequence at a time)


# --------------------------------------------------------------------------- child processes
def child_mixbuild(artifact: str, threads: int, tokens: int, repeats: int, mode: str) -> dict:
    """mode: "1" / "4" (the fast kernels at that accuracy level) or "body"."""
    import mixbuild.runtime as rt
    from mixbuild.runtime.api import LoadOptions, Model
    from mixbuild.runtime.ort_runner import OrtRunner
    from mixbuild.runtime.sampling import GenerationDefaults
    from mixbuild.runtime.steps import FeedStep
    from mixbuild.runtime.tokenizer import Tokenizer

    if mode == "body":   # one session only: the body's (the resident memory is its own)
        runner = OrtRunner(artifact, threads=threads, fast_quantized=False)
        spec = runner.spec
        model = Model(FeedStep(runner), spec, Tokenizer.from_dir(Path(artifact)),
                      GenerationDefaults.read(Path(artifact), spec.eos_token_id, spec.vocab_size),
                      LoadOptions(max_batch=BATCH, threads=threads), "ort")
    else:
        model = rt.load(artifact, threads=threads, max_batch=BATCH, accuracy_level=int(mode))
    kernels = getattr(getattr(model.step, "runner", None), "kernels", None)
    loaded_rss = _rss_mib()
    ids = _prompt_ids(model)
    rates, out = {1: [], BATCH: []}, None
    for i in range(repeats + 1):
        out = model.generate_ids([ids], max_new_tokens=tokens, ignore_eos=True)[0]
        start = time.perf_counter()
        model.generate_ids([ids[:len(ids) - j % 3] for j in range(BATCH)],
                           max_new_tokens=tokens, ignore_eos=True)
        if i:
            rates[1].append(out.timings.decode_tokens_per_s)
            rates[BATCH].append(BATCH * tokens / (time.perf_counter() - start))
    return {"tok_s": max(rates[1]), "tok_s_batch": max(rates[BATCH]), "rss_mib": _rss_mib(),
            "loaded_rss_mib": loaded_rss, "tokens": out.token_ids, "kernels": kernels}


def _prompt_ids(model) -> list[int]:
    if model.tokenizer is not None:
        return model.tokenizer.encode(PROMPT)
    return [1, 523, 1910, 77, 4012, 9]


def child_llama(gguf: str, threads: int, tokens: int, repeats: int) -> dict:
    from llama_cpp import Llama

    options = dict(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=512,
                   n_batch=64, verbose=False, seed=0)
    try:   # quantized GGUFs have crashed in llama_decode with the extra buffer types on
        llm = Llama(**options, use_extra_bufts=False)
    except TypeError:
        llm = Llama(**options)
    loaded_rss = _rss_mib()
    prompt = llm.tokenize(PROMPT.encode())
    rates = []
    for i in range(repeats + 1):
        llm.reset()
        stamps = []
        # llama.generate yields greedy tokens without stopping at end-of-sequence (as
        # ignore_eos on the mixbuild side): exactly `tokens` of them
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == tokens:
                break
        if i:
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"tok_s": max(rates), "rss_mib": _rss_mib(), "loaded_rss_mib": loaded_rss}


def child_quantize(src: str, dst: str, kind: str) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE[kind]
    params.nthread = 2
    part = dst + ".part"
    if llama_cpp.llama_model_quantize(src.encode(), part.encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed for {src}")
    Path(part).rename(dst)
    return {}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- parent
def run_child(python: Path, args: list[str], timeout: float = 1800) -> dict:
    done = subprocess.run([str(python), str(Path(__file__).resolve()), "--child", *args],
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else
                           f"exit {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def export(checkpoint: Path, out: Path, precision: str, calib_tokens: int,
           flags: tuple[str, ...] = ()) -> Path:
    if (out / "mixbuild.json").is_file():
        return out
    cmd = [sys.executable, "-m", "mixbuild", "export", str(checkpoint), "-o", str(out),
           "--layout", "concat", "--overwrite", *flags]
    if precision != "fp32":
        cmd += ["--precision", precision, "--calib-tokens", str(calib_tokens)]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def ggufs(name: str, checkpoint: Path, work: Path, logs: Path) -> dict[str, Path]:
    import serving

    python = serving.venv_python("llama")
    f32 = serving.gguf_file(name, checkpoint, work, logs / f"gguf-{name}.log")
    files = {"f32": f32, "q8_0": work / f"{name}-q8_0.gguf", "q4_0": work / f"{name}-q4_0.gguf"}
    if not files["q8_0"].is_file():
        src = serving.llama_sources()
        code = (f"import sys; sys.path[:0] = [{str(src)!r}, {str(src / 'gguf-py')!r}]\n"
                "import conversion.base as b; b.TextModel.get_vocab_base_pre = lambda s, t: 'gpt-2'\n"
                "import convert_hf_to_gguf as c\n"
                f"sys.argv = ['c', {str(checkpoint)!r}, '--outfile', {str(files['q8_0']) + '.part'!r},"
                " '--outtype', 'q8_0']\nc.main()\n")
        subprocess.run([str(python), "-c", code], check=True, capture_output=True)
        Path(str(files["q8_0"]) + ".part").rename(files["q8_0"])
    if not files["q4_0"].is_file():
        run_child(python, ["quantize", str(f32), str(files["q4_0"]), "q4_0"])
    return files


def size_mib(path: Path) -> float:
    paths = [path] if path.is_file() else [p for p in path.iterdir() if p.name.startswith("model.onnx")]
    return sum(p.stat().st_size for p in paths) / 2**20


def bench(args) -> list[dict]:
    """Every engine x precision of every model, --rounds times in turn (each keeps its best:
    decode on this shared 2-core machine swings from run to run, float32 most)."""
    import serving
    from generation import bench_models

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    rows = []
    llama_error = None
    try:
        serving.ensure_peer("llama", not args.no_setup, logs)
    except Exception as exc:
        llama_error = str(exc)
    for name, checkpoint in bench_models(work, args.skip_large):
        serving.add_tokenizer(checkpoint)
        jobs = []   # (row, python, child arguments)
        for label, (precision, flags, mode) in MIXBUILD.items():
            suffix = "".join(f"-{f.strip('-').replace('-', '')}" for f in flags)  # -lmhead-int8
            artifact = export(checkpoint, work / f"{name}-concat-{precision}{suffix}", precision,
                              args.calib_tokens, flags)
            tokens = args.body_tokens if mode == "body" else args.new_tokens
            jobs.append(({"model": name, "engine": "mixbuild", "precision": label,
                          "file_mib": size_mib(artifact)}, Path(sys.executable),
                         ["mixbuild", str(artifact), str(args.threads), str(tokens),
                          str(args.repeats), str(mode)]))
        if llama_error:
            rows.append({"model": name, "engine": "llama.cpp", "precision": "-", "error": llama_error})
        else:
            try:
                files = ggufs(name, checkpoint, work, logs)
            except Exception as exc:
                rows.append({"model": name, "engine": "llama.cpp", "precision": "-", "error": str(exc)})
                files = {}
            for kind, gguf in files.items():
                jobs.append(({"model": name, "engine": "llama.cpp", "precision": kind,
                              "file_mib": size_mib(gguf)}, serving.venv_python("llama"),
                             ["llama", str(gguf), str(args.threads), str(args.new_tokens),
                              str(args.repeats)]))
        for round_ in range(args.rounds):
            for row, python, child_args in jobs:
                if "error" in row:
                    continue
                try:
                    r = run_child(python, child_args)
                except Exception as exc:
                    row["error"] = str(exc)
                    continue
                for key in ("tok_s", "tok_s_batch"):
                    if r.get(key) is not None:
                        row[key] = max(row.get(key, 0.0), r[key])
                row["rss_mib"] = r["rss_mib"]
                if r.get("kernels"):
                    row["kernels"] = r["kernels"]
                print(f"  round {round_ + 1}: " + _line(row, jobs[0][0].get("tok_s")), flush=True)
        fp32_rate = jobs[0][0].get("tok_s")
        for row, _, _ in jobs:
            if "tok_s" in row and fp32_rate:
                row["vs_mixbuild_fp32"] = row["tok_s"] / fp32_rate
            rows.append(row)
    return rows


def _line(row: dict, fp32: float | None) -> str:
    ratio = f"{row['tok_s'] / fp32:.2f}x" if fp32 else "-"
    return (f"  {row['model']:12} {row['engine']:9} {row['precision']:22} {row['tok_s']:8.1f} tok/s "
            f"({ratio} mixbuild fp32)  RSS {row['rss_mib']:.0f} MiB  file {row['file_mib']:.0f} MiB")


def render(rows: list[dict]) -> str:
    lines = ["| model | engine | precision | decode tok/s, batch 1 | vs mixbuild fp32 | "
             f"tok/s, batch {BATCH} (prefill included) | peak RSS MiB | weights file MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['engine']} | {r['precision']} | "
                         f"failed: {r['error'][:120]} | | | | |")
            continue
        ratio = f"{r['vs_mixbuild_fp32']:.2f}x" if "vs_mixbuild_fp32" in r else "-"
        batch = f"{r['tok_s_batch']:.1f}" if r.get("tok_s_batch") else "-"
        lines.append(f"| {r['model']} | {r['engine']} | {r['precision']} | {r['tok_s']:.1f} | {ratio} | "
                     f"{batch} | {r['rss_mib']:.0f} | {r['file_mib']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        ok = [r for r in rows if r["model"] == model and "tok_s" in r]
        labels = [f"{r['engine']}\n{r['precision']}" for r in ok]
        colors = ["tab:blue" if r["engine"] == "mixbuild" else "tab:orange" for r in ok]
        ax.bar(range(len(ok)), [r["tok_s"] for r in ok], color=colors)
        ax.set_xticks(range(len(ok)), labels, fontsize=6, rotation=60, ha="right")
        ax.set_ylabel("decode tokens/s (batch 1)")
        ax.set_yscale("log")
        ax.set_title(model)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--body-tokens", type=int, default=16, help="tokens for the slow 'body' runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="runs of every engine, in turn; best kept")
    p.add_argument("--calib-tokens", type=int, default=512)
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--no-setup", action="store_true", help="do not build llama.cpp's venv")
    p.add_argument("--workdir", default=str(ROOT / "benchmarks" / ".venvs" / "work"))
    p.add_argument("--out", default=".")
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "mixbuild":
            result = child_mixbuild(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), rest[4])
        elif kind == "llama":
            result = child_llama(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        else:
            result = child_quantize(*rest)
        print(json.dumps(result))
        return
    rows = bench(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = render(rows)
    print(table)
    (out / "quantized_decode.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "quantized_decode.png")
    print(f"wrote {out / 'quantized_decode.json'} and {out / 'quantized_decode.png'}")


if __name__ == "__main__":
    main()
