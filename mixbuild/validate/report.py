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

from mixbuild.contract import REPORT_FILE, REPORT_SCHEMA
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
            plot_report(report, tmp / "report.png")
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
    basis = "expert output max abs error" if w.basis == "expert_max_abs" else "hidden error growth"
    return f"{where} ({basis} {w.value:.4g})"


def render_markdown(report: Report) -> str:
    """report.md: verdict, checks, key metrics, greedy divergence, per-layer and per-expert tables."""
    m = report.metrics
    lines = [f"# Validation: {'PASSED' if report.passed else 'FAILED'}", "",
             f"- artifact backend: `{report.backend}` at precision `{report.precision}`",
             f"- reference: `{report.reference}`",
             f"- {m.sequences} sequences, {m.positions} compared positions; {_agreement_text(m)}",
             f"- {_divergence_text(report)}", f"- worst: {_worst_text(report)}"]
    lines += [f"- **non-finite values**: {line}" for line in report.non_finite]
    if report.skipped:
        lines.append(f"- skipped (not measurable with these runners): {', '.join(report.skipped)}")
    lines += ["", "## Checks", "", "| metric | value | bound | threshold | result |",
              "|---|---|---|---|---|"]
    lines += [f"| {c.name} | {fmt(c.value)} | {c.bound.replace('|', chr(92) + '|')} | {fmt(c.threshold)} | "
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
    lines = ["## Layers", "", "| layer | hidden max abs | router logits max abs | router flip rate "
             "| flips | near-tie flips | worst expert |", "|---|---|---|---|---|---|---|"]
    for lr in report.layers:
        errors = [(e, x) for e, x in enumerate(lr.expert_max_abs) if x is not None]
        worst = max(errors, key=lambda t: t[1]) if errors else None
        worst = worst if worst and worst[1] > 0 else None
        worst_text = f"{worst[0]} ({fmt(worst[1])})" if worst else "—"
        lines.append(f"| {lr.layer} | {fmt(lr.hidden_max_abs)} | {fmt(lr.router_logits_max_abs)} | "
                     f"{fmt(lr.router_flip_rate)} | {fmt(lr.router_flips)} | "
                     f"{fmt(lr.near_tie_flips)} | {worst_text} |")
    return lines + [""]


def _expert_table(report: Report) -> list[str]:
    width = max((len(lr.expert_max_abs) for lr in report.layers), default=0)
    if width == 0:
        return []
    lines = ["## Per-expert output max abs error", "",
             "| layer | " + " | ".join(f"e{e}" for e in range(width)) + " |",
             "|---" * (width + 1) + "|"]
    for lr in report.layers:
        cells = [fmt(x) for x in lr.expert_max_abs] + ["—"] * (width - len(lr.expert_max_abs))
        lines.append(f"| {lr.layer} | " + " | ".join(cells) + " |")
    return lines + [""]


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
    for column in ("metric", "value", "threshold", "result"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for c in report.checks:
        result = "[green]pass[/green]" if c.passed else "[bold red]FAIL[/bold red]"
        table.add_row(c.name, fmt(c.value), f"{c.bound} {fmt(c.threshold)}", result)
    console.print(table)
    verdict = "[bold green]PASSED[/bold green]" if report.passed else "[bold red]FAILED[/bold red]"
    console.print(f"{verdict}  ppl {fmt(report.metrics.ppl_reference)} -> "
                  f"{fmt(report.metrics.ppl_artifact)}; {_divergence_text(report)}")
    console.print(_agreement_text(report.metrics))
    console.print(f"worst: {_worst_text(report)}")
    for line in report.non_finite:
        console.print(f"[bold red]non-finite values:[/bold red] {escape(line)}")
    if report.skipped:
        console.print(f"skipped: {', '.join(report.skipped)}")
