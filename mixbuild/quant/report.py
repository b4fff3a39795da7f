"""What quantization reports: per layer and per expert, weight error and calibration load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixbuild.quant.calibrate import LayerCalibration


def summary(calibration: list[LayerCalibration]) -> list[dict[str, Any]]:
    """The per-layer record stored in the manifest."""
    return [{
        "layer": i,
        "routed_tokens": c.routed,
        "activation_amax": c.amax,
        "awq_alpha": c.alpha,
        "weight_rel_error": c.weight_error,
        "expert_rel_error": c.expert_error,
    } for i, c in enumerate(calibration)]


def print_table(calibration: list[LayerCalibration], precision: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{precision} quantization: relative weight error and calibration load")
    for col in ("layer", "attn q/k/v/o err", "experts gate_up err (max)", "experts down err (max)",
                "routed tokens per expert (min..max)", "AWQ alpha"):
        table.add_column(col)
    for i, c in enumerate(calibration):
        attn = " / ".join(f"{c.weight_error[n]:.3f}" for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        alpha = ", ".join(f"{k} {v:.2f}" for k, v in c.alpha.items()) or "-"
        table.add_row(str(i), attn, f"{max(c.expert_error['gate_up']):.3f}",
                      f"{max(c.expert_error['down']):.3f}", f"{min(c.routed)}..{max(c.routed)}", alpha)
    Console().print(table)


def plot_expert_load(calibration: list[LayerCalibration], path: Path) -> Path:
    """Heatmap of the share of routed calibration tokens per (layer, expert)."""
    import numpy as np

    from mixbuild.errors import require

    require("matplotlib", "plot", "the expert-load plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    load = np.array([c.routed for c in calibration], dtype=np.float64)
    share = load / np.maximum(load.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(1.2 + 0.6 * share.shape[1], 1.0 + 0.45 * share.shape[0]))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("routed calibration tokens (share per layer)")
    ax.set_xticks(range(share.shape[1]))
    ax.set_yticks(range(share.shape[0]))
    for (row, col), value in np.ndenumerate(share):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
