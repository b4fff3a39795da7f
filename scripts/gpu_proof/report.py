"""gpu_proof.json, gpu_proof.md and the plots; every file written atomically (mixbuild.atomic).

The JSON is rewritten after every stage, so a run cut off by the machine's time limit still
leaves the stages it finished.
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA = "mixbuild-gpu-proof"
JSON_FILE, MD_FILE = "gpu_proof.json", "gpu_proof.md"


def is_ours(out_dir: Path) -> bool:
    try:
        return json.loads((out_dir / JSON_FILE).read_text()).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def previous_files(out_dir: Path) -> list[str]:
    try:
        return list(json.loads((out_dir / JSON_FILE).read_text()).get("files", []))
    except (OSError, ValueError, AttributeError):
        return []


def write_text(path: Path, text: str) -> None:
    from mixbuild.atomic import atomic_file

    with atomic_file(path) as tmp:
        Path(tmp).write_text(text)


def document(doc: dict) -> str:
    return json.dumps(doc, indent=2, default=_plain) + "\n"


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# ------------------------------------------------------------------------------- markdown

def markdown(doc: dict) -> str:
    env = doc.get("environment", {})
    lines = [f"# GPU proof{' (dry run: CPU, Triton interpreter, tiny shapes)' if doc['dry_run'] else ''}",
             "", f"{doc['started']}, budget {doc['budget_s']} s, "
             f"{'PASSED' if doc['passed'] else 'FAILED'} "
             f"({sum(s['passed'] for s in doc['stages'])}/{len(doc['stages'])} stages)", "",
             "| | |", "|---|---|"]
    for key in ("gpu", "compute_capability", "gpu_memory_bytes", "torch", "triton", "cuda"):
        if env.get(key) is not None:
            lines.append(f"| {key} | {env[key]} |")
    lines += ["", "## Stages", "", "| stage | passed | seconds | goals met | note |",
              "|---|---|---|---|---|"]
    for s in doc["stages"]:
        goals = s.get("goals", [])
        met = f"{sum(g['met'] is True for g in goals)}/{len(goals)}" if goals else "-"
        note = s.get("skipped") or ""
        if s.get("error"):
            note = s["error"].splitlines()[0][:120]
        lines.append(f"| {s['name']} | {_yes(s['passed'])} | {s['seconds']:.1f} | {met} | "
                     f"{_cell(note)} |")
    lines += ["", "## Goals", "", "| stage | goal | met | detail |", "|---|---|---|---|"]
    for s in doc["stages"]:
        for g in s.get("goals", []):
            met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
            lines.append(f"| {s['name']} | {_cell(g['name'])} | {met} | {_cell(g['detail'])} |")
    for s in doc["stages"]:
        table = DETAIL_TABLES.get(s["name"])
        if table is not None and not s.get("skipped") and "error" not in s:
            lines += ["", f"## {s['name']}", "", *table(s)]
    for name in doc.get("plots", []):
        lines += ["", f"![{name}]({name})"]
    return "\n".join(lines) + "\n"


def _yes(value) -> str:
    return "yes" if value else "**no**"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _environment_table(s: dict) -> list[str]:
    dense = s.get("dense_tflops", {})
    return ["| ceiling | value |", "|---|---|",
            f"| copy bandwidth (read + write) | {_num(s.get('copy_bandwidth_GBps'), 4)} GB/s |",
            *(f"| dense GEMM {k} | {_num(v, 4)} TFLOP/s |" for k, v in dense.items())]


def _correctness_table(s: dict) -> list[str]:
    rows = ["| kernel | scheme | T, E, k, H, I | max error | limit | passed |",
            "|---|---|---|---|---|---|"]
    for c in s.get("cases", []):
        rows.append(f"| {c['kernel']} | {c['scheme']} | {', '.join(map(str, c['shape']))} | "
                    f"{_num(c.get('max_error'))} | {_num(c.get('limit'))} | "
                    f"{c.get('skipped') or _yes(c['passed'])} |")
    return rows


def _e2e_table(s: dict) -> list[str]:
    g = s["greedy"]
    rows = [f"Greedy on {g['device']}: fp32 {g['fp32_matching']}/{g['tokens']} tokens equal the "
            f"CPU's, bf16 {g['bf16_matching']}/{g['tokens']}.", "",
            "| validate | exit | passed | top-1 | KL mean | ppl delta | greedy match |",
            "|---|---|---|---|---|---|---|"]
    for v in s.get("validate", []) + s.get("quantized", []):
        name = v.get("name") or v.get("precision") or v.get("dtype")
        if "exit_code" not in v:
            rows.append(f"| {name} | - | {_cell(v.get('skipped') or v.get('error'))} | | | | |")
            continue
        rows.append(f"| {name} | {v['exit_code']} | {_yes(v['passed'])} | "
                    f"{_num(v.get('top1_agreement'))} | {_num(v.get('kl_mean'))} | "
                    f"{_num(v.get('ppl_rel_delta'))} | {_num(v.get('greedy_match_fraction'))} |")
    return rows


def _bench_table(s: dict) -> list[str]:
    rows = ["| dtype | M | experts | triton us | GB/s | % copy | TFLOP/s | % dense | "
            "torch-loop us | grouped_mm us |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in s.get("rows", []):
        t, m = r["methods"]["triton"], r["methods"]
        rows.append(f"| {r['dtype']} | {r['M']} | {r['experts_used']} | {_us(t)} | "
                    f"{_num(t.get('weight_GBps'), 4)} | {_num(t.get('pct_copy'))} | "
                    f"{_num(t.get('tflops'))} | {_num(t.get('pct_dense'))} | "
                    f"{_us(m['torch-loop'])} | {_us(m['grouped_mm'])} |")
    return rows


def _us(method: dict) -> str:
    if "seconds" not in method:
        return "n/a"
    return f"{method['seconds'] * 1e6:.1f}"


def _decode_table(s: dict) -> list[str]:
    rows = ["| scheme | batch | step ms | floor ms | x floor | tokens/s | naive ms | speedup |",
            "|---|---|---|---|---|---|---|---|"]
    for r in s.get("rows", []):
        rows.append(f"| {r['scheme']} | {r['batch']} | {_num(r['step_ms'])} | "
                    f"{_num(r.get('floor_ms'))} | {_num(r.get('vs_floor'))} | "
                    f"{_num(r['tokens_per_s'], 4)} | {_num(r.get('naive_ms'))} | "
                    f"{_num(r.get('speedup_vs_naive'))} |")
    return rows


def _tuning_table(s: dict) -> list[str]:
    rows = ["| dtype | M | ran / tried | default us | best us | best config |", "|---|---|---|---|---|---|"]
    for r in s.get("results", []):
        rows.append(f"| {r['dtype']} | {r['M']} | {r['ran']}/{r['candidates']} | "
                    f"{_num(r['default_us'])} | {_num(r['best_us'])} | {_cell(r['best'])} |")
    return rows + ["", "Config files: " + ", ".join(s.get("config_files", []) or ["none"])]


DETAIL_TABLES = {"environment": _environment_table, "kernel_correctness": _correctness_table,
                 "end_to_end": _e2e_table, "kernel_benchmark": _bench_table,
                 "decode": _decode_table, "tuning": _tuning_table}


# ---------------------------------------------------------------------------------- plots

def plots(doc: dict, out_dir: Path) -> list[str]:
    """The PNGs that help: kernel bandwidth vs M, decode step time vs batch with its floor."""
    import matplotlib

    matplotlib.use("Agg")
    stages = {s["name"]: s for s in doc["stages"]}
    written = []
    bench = stages.get("kernel_benchmark", {})
    if bench.get("rows"):
        written.append(_save(_bench_figure(bench, doc.get("ceilings", {})), out_dir,
                             "kernel_bandwidth.png"))
    decode = stages.get("decode", {})
    if decode.get("rows"):
        written.append(_save(_decode_figure(decode), out_dir, "decode.png"))
    return written


def _bench_figure(bench: dict, ceilings: dict):
    import matplotlib.pyplot as plt

    fig, (bw, fl) = plt.subplots(1, 2, figsize=(11, 4))
    for dtype in sorted({r["dtype"] for r in bench["rows"]}):
        rows = [r for r in bench["rows"] if r["dtype"] == dtype and "seconds" in r["methods"]["triton"]]
        ms = [r["M"] for r in rows]
        bw.plot(ms, [r["methods"]["triton"]["weight_GBps"] for r in rows], "o-", label=dtype)
        fl.plot(ms, [r["methods"]["triton"]["tflops"] for r in rows], "o-", label=dtype)
    if ceilings.get("copy_bytes_per_s"):
        bw.axhline(ceilings["copy_bytes_per_s"] / 1e9, color="k", ls="--", label="copy bandwidth")
    for dtype, value in (ceilings.get("dense_tflops") or {}).items():
        if value:
            fl.axhline(value, ls="--", color="k" if dtype == "bf16" else "gray",
                       label=f"dense {dtype}")
    bw.set(xscale="log", xlabel="tokens M", ylabel="expert weight GB/s", title="MoE kernels: bandwidth")
    fl.set(xscale="log", yscale="log", xlabel="tokens M", ylabel="TFLOP/s", title="MoE kernels: compute")
    bw.legend()
    fl.legend()
    fig.tight_layout()
    return fig


def _decode_figure(decode: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for scheme, color in (("fp8", "tab:blue"), ("int4", "tab:orange")):
        rows = [r for r in decode["rows"] if r["scheme"] == scheme]
        if not rows:
            continue
        batches = [r["batch"] for r in rows]
        ax.plot(batches, [r["step_ms"] for r in rows], "o-", color=color, label=f"{scheme} step")
        if all("floor_ms" in r for r in rows):
            ax.plot(batches, [r["floor_ms"] for r in rows], "--", color=color,
                    label=f"{scheme} floor")
        naive = [(r["batch"], r["naive_ms"]) for r in rows if "naive_ms" in r]
        if naive:
            ax.plot(*zip(*naive), ":", color=color, label=f"{scheme} naive torch")
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms per decode step",
           title="8x7B-shaped decode step vs its memory floor")
    ax.legend()
    fig.tight_layout()
    return fig


def _save(fig, out_dir: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    from mixbuild.atomic import atomic_file

    with atomic_file(out_dir / name) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return name
