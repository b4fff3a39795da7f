"""Writing and showing a validation Report.

    write_report(report, "validation/")   # report.json, report.md, report.png, atomically
    print_summary(report)                 # a compact rich table on the terminal

report.json keys: schema, passed, precision, backend, reference, metrics (logits_max_abs,
logits_cosine_min, kl_mean, top1_agreement, top5_agreement, ppl_reference, ppl_artifact,
ppl_rel_delta, greedy_match_steps, greedy_steps, first_divergence, ...), layers (layer,
hidden_max_abs, router_logits_max_abs, router_flip_rate, near_tie_flips, expert_max_abs, ...),
checks ({metric: {value, threshold, bound, passed}}), worst ({layer, expert, value, basis} or
null), skipped (metrics that could not be measured), non_finite (what held NaN or Inf; any entry
fails the report).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mixbuild.contract import REPORT_FILE, REPORT_PLOT_FILE, REPORT_SCHEMA
from mixbuild.errors import require
from mixbuild.validate.result import Report

SCHEMA = REPORT_SCHEMA
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def report_document(report: Report) -> dict[str, Any]:
    """The report.json document (plain JSON types; NaN written as null)."""
    from mixbuild import __version__

    doc = report.to_dict()
    doc["checks"] = {c.pop("name"): c for c in doc["checks"]}
    return {"schema": SCHEMA, "mixbuild_version": __version__, **doc}


def write_report(report: Report, out_dir: str | Path, plot: bool = True, overwrite: bool = False,
                 inputs: Iterable[str | Path] = ()) -> Path:
    """Write report.json, report.md and (when `plot`) report.png into `out_dir`, atomically
    (mixbuild.atomic): an existing `out_dir` is replaced only with `overwrite` and only when it
    is a mixbuild validation report; never when it is or holds one of `inputs`."""
    from mixbuild.atomic import atomic_directory

    if plot:
        require("matplotlib", "plot", "the validation report plot")
    with atomic_directory(out_dir, "report", overwrite, inputs) as tmp:
        (tmp / REPORT_FILE).write_text(json.dumps(report_document(report), indent=2) + "\n")
        (tmp / "report.md").write_text(render_markdown(report))
        if plot:
            plot_report(report, tmp / REPORT_PLOT_FILE)
    return Path(out_dir)


# ----------------------------------------------------------------------------- text
def fmt(value: Any) -> str:
    """Compact number formatting for tables; None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _divergence_text(report: Report) -> str:
    m, d = report.metrics, report.metrics.first_divergence
    if m.greedy_steps == 0:
        return "greedy generation skipped"
    head = f"{m.greedy_match_steps}/{m.greedy_steps} greedy steps match"
    if d is None:
        return head + "; no divergence"
    return (f"{head}; first divergence: sequence {d.sequence}, step {d.step}, token "
            f"{d.reference_token} (reference) vs {d.artifact_token} (artifact), reference "
            f"top-1/top-2 margin {d.margin:.4g}")


def _agreement_text(m) -> str:
    """Top-1 agreement with its sampling interval: over few positions a threshold close to the
    value is within the noise of the measurement."""
    if m.top1_agreement_ci95 is None:
        return "top-1 agreement not measured"
    low, high = m.top1_agreement_ci95
    return (f"top-1 agreement {m.top1_agreement:.4f} (95% interval {low:.4f}-{high:.4f} "
            f"over {m.positions} positions)")


def _worst_text(report: Report) -> str:
    w = report.worst
    if w is None:
        return "no per-layer error to localise"
    where = f"layer {w.layer}" + (f", expert {w.expert}" if w.expert is not None else "")
    if w.basis == "hidden_non_finite":
        return f"{where} (the first layer whose hidden-state error is not finite)"
    if w.basis == "attention_growth":
        return (f"layer {w.layer}, attention (it added {w.value:.4g} to the relative error of "
                "the hidden state)")
    if w.basis == "moe_growth":
        return (f"{where.replace(f'layer {w.layer}', f'layer {w.layer}, MoE')} (it added "
                f"{w.value:.4g} to the relative error of the hidden state)")
    if w.basis == "expert_rel_error":
        return (f"{where} (its relative output error {w.value:.4g} is over "
                "3x the median of all experts')")
    basis = "expert output max abs error" if w.basis == "expert_max_abs" else "hidden error growth"
    return f"{where} ({basis} {w.value:.4g})"


def _interval(interval) -> str:
    return "—" if interval is None else f"{fmt(interval[0])} .. {fmt(interval[1])}"


def _judged(c) -> str:
    return fmt(c.value) if c.statistic == "value" else f"{fmt(c.judged)} ({c.statistic})"


def inconclusive(report: Report) -> tuple[str, ...]:
    """Failed checks whose value meets the threshold but whose 95% interval does not: too few
    positions to tell, not (yet) a measured failure."""
    bounds = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t, "|x| <=": lambda v, t: abs(v) <= t}
    return tuple(c.name for c in report.failed_checks
                 if c.statistic != "value" and c.value is not None
                 and bounds[c.bound](c.value, c.threshold))


def _inconclusive_text(report: Report) -> str | None:
    names = inconclusive(report)
    if not names:
        return None
    return (f"{', '.join(names)}: the value meets the threshold but its 95% interval does not "
            f"({report.metrics.positions} positions are too few to tell); evaluate more tokens "
            "(--max-sequences, --max-tokens, --long)")


def render_markdown(report: Report) -> str:
    """report.md: verdict, checks, key metrics, greedy divergence, per-layer and per-expert tables."""
    m = report.metrics
    lines = [f"# Validation: {'PASSED' if report.passed else 'FAILED'}", "",
             f"- artifact backend: `{report.backend}` at precision `{report.precision}`",
             f"- reference: `{report.reference}`",
             f"- {m.sequences} sequences, {m.positions} compared positions; {_agreement_text(m)}",
             f"- {_divergence_text(report)}", f"- worst: {_worst_text(report)}"]
    lines += [f"- **non-finite values**: {line}" for line in report.non_finite]
    if _inconclusive_text(report):
        lines.append(f"- **inconclusive**: {_inconclusive_text(report)}")
    if report.skipped:
        lines.append(f"- skipped (not measurable with these runners): {', '.join(report.skipped)}")
    lines += ["", "## Checks", "",
              "Sampled metrics are judged on the unfavourable end of their 95% interval "
              "(docs/validation.md).", "",
              "| metric | value | 95% interval | judged | bound | threshold | result |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {c.name} | {fmt(c.value)} | {_interval(c.interval)} | {_judged(c)} | "
              f"{c.bound.replace('|', chr(92) + '|')} | {fmt(c.threshold)} | "
              f"{'pass' if c.passed else '**FAIL**'} |" for c in report.checks]
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    for name in ("logits_mean_abs", "kl_max", "top5_agreement", "ppl_reference", "ppl_artifact",
                 "router_flip_rate_mean"):
        lines.append(f"| {name} | {fmt(getattr(m, name))} |")
    return "\n".join(lines + [""] + _layer_table(report) + _expert_table(report)) + "\n"


def _layer_table(report: Report) -> list[str]:
    if not report.layers or all(lr.hidden_max_abs is None and lr.router_flip_rate is None
                                for lr in report.layers):
        return ["## Layers", "", "No per-layer debug outputs from both runners.", ""]
    lines = ["## Layers", "",
             "Relative errors are ||artifact - reference|| / ||reference|| over the real tokens; "
             "the MoE input is what the layer's attention (and post-attention norm) produced.", "",
             "| layer | MoE input rel error | hidden rel error | hidden max abs | "
             "router logits max abs | router flip rate | flips | near-tie flips | worst expert |",
             "|---|---|---|---|---|---|---|---|---|"]
    for lr in report.layers:
        rel = [(x, e) for e, x in enumerate(lr.expert_rel_error) if x is not None]
        absolute = [(x, e) for e, x in enumerate(lr.expert_max_abs) if x is not None]
        worst = max(rel or absolute, default=None)
        worst = worst if worst and worst[0] > 0 else None
        kind = "rel" if rel else "max abs"
        worst_text = f"{worst[1]} ({kind} {fmt(worst[0])})" if worst else "—"
        lines.append(f"| {lr.layer} | {fmt(lr.moe_input_rel_error)} | {fmt(lr.hidden_rel_error)} | "
                     f"{fmt(lr.hidden_max_abs)} | {fmt(lr.router_logits_max_abs)} | "
                     f"{fmt(lr.router_flip_rate)} | {fmt(lr.router_flips)} | "
                     f"{fmt(lr.near_tie_flips)} | {worst_text} |")
    return lines + [""]


def _expert_table(report: Report) -> list[str]:
    width = max((len(lr.expert_max_abs) for lr in report.layers), default=0)
    if width == 0:
        return []
    lines = []
    for title, field in (("Per-expert output max abs error", "expert_max_abs"),
                         ("Per-expert output relative error", "expert_rel_error"),
                         ("Tokens routed to each expert (reference)", "expert_tokens")):
        if not any(getattr(lr, field) for lr in report.layers):
            continue
        lines += [f"## {title}", "", "| layer | " + " | ".join(f"e{e}" for e in range(width)) + " |",
                  "|---" * (width + 1) + "|"]
        for lr in report.layers:
            values = getattr(lr, field)
            cells = [fmt(x) for x in values] + ["—"] * (width - len(values))
            lines.append(f"| {lr.layer} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------- plot
def plot_report(report: Report, path: str | Path) -> None:
    """report.png: per-layer hidden-state error (log scale), router flip rate per layer, and a
    per-(layer, expert) error heatmap when expert errors were measured. Uses the Agg canvas
    directly, so no display and no global pyplot state are involved."""
    require("matplotlib", "plot", "the validation report plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = _expert_grid(report)
    panels = 3 if grid is not None else 2
    fig = Figure(figsize=(5 * panels, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    _plot_hidden(axes[0], report)
    _plot_flips(axes[1], report)
    if grid is not None:
        _plot_experts(fig, axes[2], grid, report.worst)
    verdict = "PASSED" if report.passed else "FAILED"
    fig.suptitle(f"{report.backend} ({report.precision}) vs {report.reference}: {verdict}")
    fig.tight_layout()
    fig.savefig(str(path), format="png")


def _per_layer(ax, report: Report, field: str, title: str, missing: str, color: str,
               floor: float = float("-inf")) -> list:
    """Bar chart of one per-layer metric (values raised to `floor`); returns the plotted values
    ([] when none)."""
    rows = [(lr.layer, max(getattr(lr, field), floor)) for lr in report.layers
            if getattr(lr, field) is not None]
    ax.set_title(title)
    ax.set_xlabel("layer")
    if not rows:
        ax.text(0.5, 0.5, missing, ha="center", va="center", transform=ax.transAxes)
        return []
    ax.bar([layer for layer, _ in rows], [value for _, value in rows], color=color)
    _integer_ticks(ax.xaxis)
    return [value for _, value in rows]


def _plot_hidden(ax, report: Report) -> None:
    if _per_layer(ax, report, "hidden_max_abs", "hidden state max abs error",
                  "no hidden-state outputs", "tab:blue", floor=1e-12):
        ax.set_yscale("log")


def _plot_flips(ax, report: Report) -> None:
    values = _per_layer(ax, report, "router_flip_rate", "router flip rate", "no router outputs",
                        "tab:orange")
    if values:
        ax.set_ylim(0, max(max(values) * 1.2, 0.01))


def _expert_grid(report: Report):
    import numpy as np

    width = max((len(lr.expert_max_abs) for lr in report.layers), default=0)
    if width == 0:
        return None
    grid = np.full((len(report.layers), width), np.nan)
    for row, lr in enumerate(report.layers):
        for e, x in enumerate(lr.expert_max_abs):
            if x is not None:
                grid[row, e] = x
    return grid


def _plot_experts(fig, ax, grid, worst) -> None:
    import numpy as np
    from matplotlib.patches import Rectangle

    shown = np.log10(np.maximum(grid, 1e-12))
    image = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap="viridis")
    ax.set_title("expert output max abs error (log10)")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    _integer_ticks(ax.xaxis, ax.yaxis)
    if worst is not None and worst.expert is not None:
        ax.add_patch(Rectangle((worst.expert - 0.5, worst.layer - 0.5), 1, 1, fill=False,
                               edgecolor="red", linewidth=2))
    fig.colorbar(image, ax=ax)


def _integer_ticks(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True))


# ----------------------------------------------------------------------------- terminal
def print_summary(report: Report, console=None) -> None:
    """A compact rich table of the checks, then the verdict, greedy result and worst location."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"validate {report.backend} ({report.precision}) vs {report.reference}")
    for column in ("metric", "value", "95% interval", "judged", "threshold", "result"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for c in report.checks:
        result = "[green]pass[/green]" if c.passed else "[bold red]FAIL[/bold red]"
        table.add_row(c.name, fmt(c.value), _interval(c.interval), escape(_judged(c)),
                      f"{c.bound} {fmt(c.threshold)}", result)
    console.print(table)
    verdict = "[bold green]PASSED[/bold green]" if report.passed else "[bold red]FAILED[/bold red]"
    console.print(f"{verdict}  ppl {fmt(report.metrics.ppl_reference)} -> "
                  f"{fmt(report.metrics.ppl_artifact)}; {_divergence_text(report)}")
    console.print(_agreement_text(report.metrics))
    console.print(f"worst: {_worst_text(report)}")
    if _inconclusive_text(report):
        console.print(f"[bold yellow]inconclusive:[/bold yellow] {escape(_inconclusive_text(report))}")
    for line in report.non_finite:
        console.print(f"[bold red]non-finite values:[/bold red] {escape(line)}")
    if report.skipped:
        console.print(f"skipped: {', '.join(report.skipped)}")


# ----------------------------------------------------------------------------- several artifacts
COMPARED = ("kl_mean", "top1_agreement", "ppl_rel_delta", "router_flip_rate",
            "expert_rel_error", "greedy_match_fraction", "logits_max_abs")


def comparison_rows(results) -> list[dict]:
    """One row per (name, report): verdict, precision, worst location, and per check its value
    and judged statistic, exactly as in each artifact's own report."""
    rows = []
    for name, report in results:
        checks = {c.name: c for c in report.checks}
        row = {"artifact": name, "passed": report.passed, "precision": report.precision,
               "positions": report.metrics.positions, "worst": _worst_text(report)}
        for metric in COMPARED:
            c = checks.get(metric)
            row[metric] = None if c is None else {"value": c.value, "judged": c.judged,
                                                  "statistic": c.statistic,
                                                  "threshold": c.threshold, "passed": c.passed}
        rows.append(row)
    return rows


def render_comparison(results) -> str:
    """report.md of a several-artifact run: one table, one row per artifact."""
    rows = comparison_rows(results)
    head = ["artifact", "verdict", "precision", *COMPARED, "worst"]
    lines = ["# Validation: several artifacts against one reference", "",
             f"Same reference and tokens for every artifact ({rows[0]['positions']} compared "
             "positions). Cells: value (judged statistic / threshold); each artifact's full "
             "report is in its own directory.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["artifact"], "PASSED" if row["passed"] else "**FAILED**", row["precision"]]
        for metric in COMPARED:
            c = row[metric]
            if c is None:
                cells.append("—")
                continue
            judged = "" if c["statistic"] == "value" else f"{fmt(c['judged'])} {c['statistic']}, "
            mark = "" if c["passed"] else " **FAIL**"
            cells.append(f"{fmt(c['value'])} ({judged}thr {fmt(c['threshold'])}){mark}")
        cells.append(row["worst"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(results, out_dir: str | Path, plot: bool = True, overwrite: bool = False,
                     inputs: Iterable[str | Path] = ()) -> Path:
    """A several-artifact report directory, atomically: NAME/report.{json,md,png} per artifact,
    and report.json (every row), report.md (one table) and report.png (one plot) at the top."""
    from mixbuild import __version__
    from mixbuild.atomic import atomic_directory

    if plot:
        require("matplotlib", "plot", "the validation report plot")
    with atomic_directory(out_dir, "report", overwrite, inputs) as tmp:
        for name, report in results:
            sub = tmp / name
            sub.mkdir()
            (sub / REPORT_FILE).write_text(json.dumps(report_document(report), indent=2) + "\n")
            (sub / "report.md").write_text(render_markdown(report))
            if plot:
                plot_report(report, sub / REPORT_PLOT_FILE)
        doc = {"schema": SCHEMA, "mixbuild_version": __version__,
               "passed": all(r.passed for _, r in results),
               "artifacts": [{"name": n, "report": f"{n}/{REPORT_FILE}"} for n, _ in results],
               "comparison": comparison_rows(results)}
        (tmp / REPORT_FILE).write_text(json.dumps(_clean_json(doc), indent=2) + "\n")
        (tmp / "report.md").write_text(render_comparison(results))
        if plot:
            plot_comparison(results, tmp / REPORT_PLOT_FILE)
    return Path(out_dir)


def _clean_json(value):
    from mixbuild.validate.result import _clean

    return _clean(value)


def plot_comparison(results, path: str | Path) -> None:
    """report.png of a several-artifact run: KL and top-1 (each with its 95% interval and
    threshold) per artifact, and the per-layer hidden-state relative error of each."""
    require("matplotlib", "plot", "the validation report plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    names = [n for n, _ in results]
    for ax, metric in zip(axes[:2], ("kl_mean", "top1_agreement")):
        checks = [next((c for c in r.checks if c.name == metric), None) for _, r in results]
        values = [c.value if c is not None and c.value is not None else float("nan") for c in checks]
        low = [v - c.interval[0] if c is not None and c.interval else 0.0 for v, c in zip(values, checks)]
        high = [c.interval[1] - v if c is not None and c.interval else 0.0 for v, c in zip(values, checks)]
        colors = ["tab:green" if c is not None and c.passed else "tab:red" for c in checks]
        ax.bar(range(len(names)), values, yerr=[low, high], color=colors, capsize=4)
        threshold = next((c.threshold for c in checks if c is not None), None)
        if threshold is not None:
            ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
            ax.legend()
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_title(f"{metric} (95% interval)")
    ax = axes[2]
    for name, report in results:
        rows = [(lr.layer, lr.hidden_rel_error) for lr in report.layers
                if lr.hidden_rel_error is not None]
        if rows:
            ax.plot([r[0] for r in rows], [max(r[1], 1e-12) for r in rows], marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_title("hidden state relative error")
    _integer_ticks(ax.xaxis)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.suptitle("artifacts vs " + results[0][1].reference)
    fig.tight_layout()
    fig.savefig(str(path), format="png")


def print_comparison(results, console=None) -> None:
    """The several-artifact table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"validate {len(results)} artifacts vs {results[0][1].reference}")
    table.add_column("artifact", justify="left")
    for column in ("verdict", *COMPARED):
        table.add_column(column, justify="right")
    for row in comparison_rows(results):
        cells = ["[green]PASSED[/green]" if row["passed"] else "[bold red]FAILED[/bold red]"]
        for metric in COMPARED:
            c = row[metric]
            cells.append("—" if c is None else
                         f"{fmt(c['value'])}" + ("" if c["passed"] else " [bold red]FAIL[/bold red]"))
        table.add_row(row["artifact"], *cells)
    console.print(table)
    for row in comparison_rows(results):
        verdict = "[bold green]PASSED[/bold green]" if row["passed"] else "[bold red]FAILED[/bold red]"
        console.print(f"{row['artifact']}: {verdict}; worst: {row['worst']}")
