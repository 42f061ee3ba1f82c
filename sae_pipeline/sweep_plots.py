"""The sweep report's plots: L0 vs FVU with the Pareto front, per-hyperparameter box plots, overlaid training
curves of the top configs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text
from matplotlib.transforms import Bbox

from sae_pipeline.markdown import format_value
from sae_pipeline.plots import figure_png
from sae_pipeline.storage import write_bytes_atomic
from sae_pipeline.sweep_stats import FAILED_CHECKS, failed_rows, finite_values, passing_rows, varying_hyperparameters

PLOT_NAME = "l0_vs_fvu.png"
BOX_PLOT_NAME = "hyperparameters.png"
CURVES_PLOT_NAME = "top_training_curves.png"
CURVE_COLUMNS: tuple[str, ...] = ("l0", "dead_fraction", "loss")
MAX_POINT_LABELS = 30
"""The L0 vs FVU plot names every config up to this many points; beyond it, the Pareto front and failed runs only."""


def write_l0_fvu_plot(table: pl.DataFrame, path: Path, sweep_name: str) -> Path | None:
    """l0_vs_fvu.png from `l0_fvu_figure`; None (no file) when nothing is plottable."""
    fig = l0_fvu_figure(table, sweep_name)
    if fig is None:
        path.unlink(missing_ok=True)
        return None
    write_bytes_atomic(path, figure_png(fig))
    return path


def l0_fvu_figure(table: pl.DataFrame, sweep_name: str) -> Figure | None:
    """L0 vs FVU scatter of the report table (`build_sweep_report`'s, with `on_pareto_front`), the Pareto front
    as a red staircase, points named by key (all up to MAX_POINT_LABELS, else the front and failed runs); None
    when no run has a finite L0 and FVU.

    Uses a bare `Figure` (Agg canvas for PNG) rather than pyplot: no global backend switch, no figure registry
    to leak into, safe in a multi-threaded Dagster process.
    """
    points = table.filter(pl.col("l0").is_finite() & pl.col("fvu").is_finite())
    if points.height == 0:
        return None
    front = points.filter(pl.col("on_pareto_front")).sort("l0", "fvu")
    failed, passing = failed_rows(points), passing_rows(points)
    fig = Figure(figsize=(9, 6), dpi=110)
    ax = fig.subplots()
    ax.scatter(passing["l0"].to_numpy(), passing["fvu"].to_numpy(), s=20, color="0.6", label="config")
    if failed.height:
        ax.scatter(failed["l0"].to_numpy(), failed["fvu"].to_numpy(), s=28, marker="x", color="C1",
                   label="failed blocking checks")
    ax.step(front["l0"].to_numpy(), front["fvu"].to_numpy(), where="post", color="C3", linewidth=1)
    ax.scatter(front["l0"].to_numpy(), front["fvu"].to_numpy(), s=36, color="C3", label="Pareto front")
    fvu = points["fvu"]
    if fvu.min() > 0 and fvu.max() / fvu.min() > 100:
        ax.set_yscale("log")
    labelled = points if points.height <= MAX_POINT_LABELS else points.filter(
        pl.col("on_pareto_front") | (pl.col(FAILED_CHECKS).list.len() > 0))
    _label_points(ax, labelled)
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel("FVU")
    which = "" if labelled.height == points.height else "; labelled: Pareto front and failed runs"
    ax.set_title(f"{sweep_name}: L0 vs FVU ({points.height} configs{which})", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def _label_points(ax, points: pl.DataFrame) -> None:
    """Name each point by its config key, in small type beside it, joined to it by a thin leader line; labels
    that would print over one another are moved apart (`_separate_labels`)."""
    labels = []
    for row in points.sort("l0", "fvu", "key").iter_rows(named=True):
        on_front = bool(row["on_pareto_front"])
        labels.append(ax.annotate(row["key"], (row["l0"], row["fvu"]), xytext=(6, 4), textcoords="offset points",
                                  fontsize=6.5, color="C3" if on_front else "0.25",
                                  fontweight="bold" if on_front else "normal",
                                  arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5,
                                              "shrinkA": 0, "shrinkB": 2}))
    _separate_labels(ax.figure, labels)


LABEL_GAP_PIXELS = 2.0


def _separate_labels(fig: Figure, labels: list) -> None:
    """Move each label, in order, past every label already placed that it overlaps, measured on the laid-out
    figure: up or down, whichever the first overlap makes shorter, and on in that direction (so it ends), and the
    keys of points at the same L0 and a close FVU stay legible."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.tight_layout()
    placed = []
    for label in labels:
        direction = 0
        for _ in range(len(placed)):  # each move passes one placed label for good: at most that many
            box = _text_box(label, renderer)
            clash = next((other for other in placed if other.overlaps(box)), None)
            if clash is None:
                break
            up, down = clash.y1 - box.y0 + LABEL_GAP_PIXELS, clash.y0 - box.y1 - LABEL_GAP_PIXELS
            direction = direction or (1 if abs(up) <= abs(down) else -1)
            x, y = label.xyann
            label.xyann = (x, y + (up if direction > 0 else down) * 72 / fig.dpi)  # offsets are in points
        placed.append(_text_box(label, renderer))


def _text_box(label: Annotation, renderer: RendererAgg) -> Bbox:
    """Where a label's text is drawn, in pixels; its window extent would include the leader line."""
    label.update_positions(renderer)
    return Text.get_window_extent(label, renderer)


def write_box_plots(table: pl.DataFrame, path: Path) -> Path | None:
    """One row of panels per varying hyperparameter: dead_fraction and fvu per value (finite values only)."""
    hps = varying_hyperparameters(table)
    metrics = [m for m in ("dead_fraction", "fvu") if finite_values(table.get_column(m)).drop_nulls().len()]
    if not hps or not metrics:
        path.unlink(missing_ok=True)
        return None
    fig = Figure(figsize=(4 * len(metrics), 2.6 * len(hps)), dpi=90)
    axes = fig.subplots(len(hps), len(metrics), squeeze=False)
    for row, hp in enumerate(hps):
        values = sorted(table.get_column(hp).drop_nulls().unique().to_list())
        for col, metric in enumerate(metrics):
            data = [finite_values(table.filter(pl.col(hp) == v).get_column(metric)).drop_nulls().to_list()
                    for v in values]
            ax = axes[row][col]
            ax.boxplot([d if d else [float("nan")] for d in data], tick_labels=[format_value(v) for v in values])
            ax.set_xlabel(hp)
            ax.set_ylabel(metric)
            if metric == "fvu":
                finite = [x for d in data for x in d]
                if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
                    ax.set_yscale("log")
    write_bytes_atomic(path, figure_png(fig))
    return path


def write_curves(logs: Mapping[str, pl.DataFrame], keys: Sequence[str], path: Path) -> Path | None:
    """L0, dead fraction and loss against training tokens, one line per top config (the run comparison view)."""
    shown = [k for k in keys if k in logs and logs[k].height]
    if not shown:
        path.unlink(missing_ok=True)
        return None
    fig = Figure(figsize=(12, 3.4), dpi=90)
    axes = fig.subplots(1, len(CURVE_COLUMNS))
    for key in shown:
        log = logs[key]
        x = log.get_column("tokens" if "tokens" in log.columns else "step").to_numpy()
        for ax, column in zip(axes, CURVE_COLUMNS, strict=True):
            if column in log.columns:
                ax.plot(x, log.get_column(column).cast(pl.Float64).to_numpy(), label=key, linewidth=1)
    for ax, column in zip(axes, CURVE_COLUMNS, strict=True):
        ax.set_title(column)
        ax.set_xlabel("tokens")
        if column == "loss":
            ax.set_yscale("log")
    axes[0].legend(fontsize=6)
    write_bytes_atomic(path, figure_png(fig))
    return path
