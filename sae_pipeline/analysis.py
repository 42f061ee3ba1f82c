"""Sweep analysis: one table, one plot and one markdown report from the finished runs of a sweep.

Conventions used throughout:
- Lower is better for every metric ranked here (dead_fraction, fvu, balanced_score); l0: lowest = sparsest.
- A null metric means "not measured": it is left out of statistics, means and correlations, and ranks last.
- A non-finite metric (NaN or ±inf, e.g. a diverged run's FVU) is treated as +inf, i.e. the worst value:
  it ranks last, makes its group mean inf and never sits on the Pareto front; statistics and correlations
  are computed over the finite values and count the non-finite ones separately.
- A run whose blocking (ERROR) quality checks failed (`failed_checks`, from its verdicts) is listed with the
  reasons and left out of every statistic, correlation, top-10, Pareto front and recommendation (the L0-FVU plot
  shows it as an x).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from sae_pipeline.consistency import seed_consistency_section
from sae_pipeline.markdown import format_duration
from sae_pipeline.plots import figure_png, png_data_uri
from sae_pipeline.saes.registry import sparsity_fields
from sae_pipeline.storage import write_bytes_atomic

HYPERPARAMETERS: tuple[str, ...] = (
    "architecture", "expansion_factor", *sparsity_fields(), "lr", "aux_coeff", "batch_size", "train_tokens",
)
"""Config fields the report tabulates: every registered architecture's sparsity field among them."""
METRICS: tuple[str, ...] = (
    "l0", "l0_fraction", "dead_fraction", "dense_fraction", "frequent_fraction", "fvu", "explained_variance", "mse",
    "relative_reconstruction_bias", "decoder_max_cosine_mean", "decoder_max_cosine_max", "final_loss",
    "train_l0_last_window", "train_dead_fraction_last_window",
)
"""Held-out metrics (summary.json), then last-window means of training metrics (second half of metrics.parquet)."""
BALANCE_METRICS: tuple[str, ...] = ("dead_fraction", "fvu")
EFFECT_METRICS: tuple[str, ...] = ("dead_fraction", "fvu", "l0")
SHOWN_METRICS: tuple[str, ...] = ("dead_fraction", "fvu", "l0")
TOP_N = 10
TOP_SUMMARY_N = 5
REPORT_NAME = "report.md"
TABLE_NAME = "metrics.parquet"
PLOT_NAME = "l0_vs_fvu.png"
BOX_PLOT_NAME = "hyperparameters.png"
CURVES_PLOT_NAME = "top_training_curves.png"
CURVES_TOP_N = 5
CURVE_COLUMNS: tuple[str, ...] = ("l0", "dead_fraction", "loss")
FAILED_CHECKS = "failed_checks"
"""Column of `runs`: the run's failed blocking checks as `name: description` strings (empty: it passed)."""
WALL_SECONDS = "wall_seconds"
"""Column of `runs`: the run's training wall time in seconds (summary.json); shown as a duration."""
MAX_POINT_LABELS = 30
"""The L0 vs FVU plot names every config up to this many points; beyond it, the Pareto front and failed runs only."""

BALANCED_SCORE_FORMULA = (
    "for each of dead_fraction and fvu, rank the configs with a finite value (average rank for ties, "
    "1 = lowest), min-max normalise the ranks to [0, 1] (0 = best config, 1 = worst; 0 for all when they are "
    "equal), give configs with a null or non-finite value 1; the balanced score is the mean of the two "
    "normalised ranks (lower is better). A metric with no finite value in the sweep is left out of the mean. "
    "Ranks rather than raw values, so that one diverged run's huge FVU does not flatten everyone else's."
)

_EFFECTS_SCHEMA: dict[str, pl.DataType] = {
    "hyperparameter": pl.String(),
    "correlation": pl.Float64(),
    "best_value": pl.String(),
    "best_mean": pl.Float64(),
    "worst_value": pl.String(),
    "worst_mean": pl.Float64(),
    "n_values": pl.Int64(),
}


@dataclass(frozen=True)
class SweepReport:
    report_path: Path
    table_path: Path
    plot_path: Path | None
    n_configs: int
    best_balanced: str | None
    top_markdown: str
    box_plot_path: Path | None = None
    curves_plot_path: Path | None = None
    pareto_dead: tuple[str, ...] = ()
    """Keys on the L0 vs dead-fraction Pareto front."""
    failed: tuple[str, ...] = ()
    """Keys whose blocking checks failed (kept off the fronts and the recommendations)."""


def last_window_mean(metrics_log: pl.DataFrame, column: str, fraction: float = 0.5) -> float:
    """Mean of `column` over the last `fraction` of the logged rows (at least one row).

    Training curves are noisy; judging on the second-half average rather than the final step (seed 000) keeps
    one lucky or unlucky step from deciding. Nulls in the window are skipped; an all-null window gives NaN.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: {fraction} must be in (0, 1]")
    if metrics_log.height == 0:
        raise ValueError(f"metrics log is empty; no window to average {column!r} over")
    n_rows = max(1, math.ceil(metrics_log.height * fraction))
    mean = metrics_log.get_column(column).tail(n_rows).cast(pl.Float64).mean()
    return float("nan") if mean is None else float(mean)


def pareto_front(frame: pl.DataFrame, x: str, y: str) -> list[str]:
    """Keys of configs not dominated in (minimise x, minimise y), sorted by x then y then key.

    A config is dominated if another is <= in both and < in one; configs with a null or non-finite x or y are
    never on the front. Exact duplicates do not dominate each other, so both stay.
    """
    if frame.height == 0 or x not in frame.columns or y not in frame.columns:
        return []
    points = frame.select(
        "key", pl.col(x).cast(pl.Float64).alias("_x"), pl.col(y).cast(pl.Float64).alias("_y")
    ).filter(pl.col("_x").is_finite() & pl.col("_y").is_finite())
    xs, ys = points.get_column("_x").to_numpy(), points.get_column("_y").to_numpy()
    # [i, j] is True when config j dominates config i
    no_worse = (xs[None, :] <= xs[:, None]) & (ys[None, :] <= ys[:, None])
    strictly_better = (xs[None, :] < xs[:, None]) | (ys[None, :] < ys[:, None])
    dominated = (no_worse & strictly_better).any(axis=1)
    front = points.filter(pl.Series(~dominated, dtype=pl.Boolean)).sort("_x", "_y", "key")
    return front.get_column("key").to_list()


def balanced_scores(frame: pl.DataFrame) -> pl.Series:
    """Balanced score per row of `frame`, lower is better, named `balanced_score`.

    Formula: for each of dead_fraction and fvu, rank the configs with a finite value (average rank for
    ties, 1 = lowest), min-max normalise the ranks to [0, 1] (0 for all when they are equal), and give configs
    with a null or non-finite value 1. The score is the mean of the two normalised ranks; a metric absent from
    the frame or without any finite value is left out of the mean, and with neither the score is null. Ranks
    rather than raw values because FVU is heavy-tailed: one diverged run would otherwise squash all others.
    """
    parts = [
        _normalised_rank(frame.get_column(m))
        for m in BALANCE_METRICS
        if m in frame.columns and _finite(frame.get_column(m)).drop_nulls().len() > 0
    ]
    if not parts:
        return pl.Series("balanced_score", [None] * frame.height, dtype=pl.Float64)
    return (sum(parts[1:], parts[0]) / len(parts)).alias("balanced_score")


def hyperparameter_effects(frame: pl.DataFrame, metric: str) -> pl.DataFrame:
    """One row per hyperparameter that varies in `frame` (more than one distinct non-null value).

    correlation: Pearson r between the numeric hyperparameter value and the metric over configs where both
    are non-null and finite (null for non-numeric hyperparameters such as architecture, or with < 2 such pairs
    or zero variance). best_value / worst_value: the value (as a string) whose group mean of the metric is
    lowest / highest, non-finite metric values counting as +inf; n_values: distinct non-null values.
    """
    rows = []
    if metric in frame.columns:
        for hp in _varying(frame):
            row = _effect_row(frame, hp, metric)
            if row is not None:
                rows.append(row)
    return pl.DataFrame(rows, schema=_EFFECTS_SCHEMA, orient="row")


def build_sweep_report(
    runs: pl.DataFrame, out_dir: Path, sweep_name: str = "sweep", missing: Sequence[str] = (),
    training_logs: Mapping[str, pl.DataFrame] | None = None,
) -> SweepReport:
    """Write metrics.parquet, the PNGs and report.md into `out_dir`, each atomically (temp + rename).

    `runs` has one row per finished config: a `key` column and any of HYPERPARAMETERS and METRICS (absent
    columns are added as nulls, other columns are dropped). `missing`: keys registered but not materialised.
    `training_logs`: key -> metrics log (step/tokens + CURVE_COLUMNS); the top balanced configs' curves are
    overlaid in top_training_curves.png. PNGs: l0_vs_fvu.png (scatter + front), hyperparameters.png (box plots
    of dead_fraction and fvu per value of each varying hyperparameter), top_training_curves.png. Runs with the
    `seed_group` and `sae_dir` columns of `results.collect_runs` add a cross-seed consistency section
    (`consistency.seed_consistency_section`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = _prepare(runs)
    passing = frame.filter(pl.col(FAILED_CHECKS).list.len() == 0)
    front = pareto_front(passing, "l0", "fvu")
    front_dead = pareto_front(passing, "l0", "dead_fraction")
    scores = passing.select("key", balanced_scores(passing))
    table = frame.join(scores, on="key", how="left").with_columns(
        pl.col("key").is_in(pl.Series(front, dtype=pl.String)).alias("on_pareto_front"),
        pl.col("key").is_in(pl.Series(front_dead, dtype=pl.String)).alias("on_pareto_front_dead"),
    ).sort("key")

    table_path = out_dir / TABLE_NAME
    buffer = io.BytesIO()
    table.write_parquet(buffer)
    write_bytes_atomic(table_path, buffer.getvalue())

    plot_path = _write_plot(table, out_dir / PLOT_NAME, sweep_name)
    ranked = _ranked_balanced(table)
    box_path = _write_box_plots(table, out_dir / BOX_PLOT_NAME)
    top_keys = ranked.get_column("key").head(CURVES_TOP_N).to_list()
    curves_path = _write_curves(training_logs or {}, top_keys, out_dir / CURVES_PLOT_NAME)
    report_path = out_dir / REPORT_NAME
    report = _render_report(table, sweep_name, list(missing), front, plot_path)
    report = _append_sections(report, table, front_dead, box_path, curves_path)
    report += seed_consistency_section(runs)
    write_bytes_atomic(report_path, report.encode())

    return SweepReport(
        report_path=report_path,
        table_path=table_path,
        plot_path=plot_path,
        n_configs=table.height,
        best_balanced=ranked.get_column("key")[0] if ranked.height else None,
        top_markdown=_config_table(ranked.head(TOP_SUMMARY_N), table, with_score=True)
        if ranked.height
        else "No finished configurations yet.",
        box_plot_path=box_path,
        curves_plot_path=curves_path,
        pareto_dead=tuple(front_dead),
        failed=tuple(_failed(table).get_column("key").to_list()),
    )


def report_with_inline_plots(report: SweepReport) -> str:
    """report.md with each plot it links embedded as a data URI, so the report reads whole where it is shown
    without its folder (Dagster metadata); the file on disk keeps plain links to the PNGs beside it."""
    text = report.report_path.read_text()
    for plot in (report.plot_path, report.box_plot_path, report.curves_plot_path):
        if plot is not None:
            text = text.replace(f"]({plot.name})", f"]({png_data_uri(plot.read_bytes())})")
    return text


# --- frame preparation and ranking ---------------------------------------------------------------------


def _prepare(runs: pl.DataFrame) -> pl.DataFrame:
    """Key, every hyperparameter and every metric as columns (absent ones null), metrics as Float64."""
    if "key" not in runs.columns:
        if runs.height:
            raise ValueError("runs: a `key` column naming each config is required")
        runs = runs.with_columns(pl.Series("key", [], dtype=pl.String))
    duplicated = runs.filter(pl.col("key").is_duplicated()).get_column("key").unique().sort().to_list()
    if duplicated:
        raise ValueError(f"runs: duplicate keys {duplicated}")
    columns = [pl.col("key").cast(pl.String)]
    for hp in HYPERPARAMETERS:
        default = pl.String if hp == "architecture" else pl.Float64
        if hp not in runs.columns:
            columns.append(pl.lit(None, dtype=default).alias(hp))
        else:
            columns.append(pl.col(hp).cast(default) if runs.schema[hp] == pl.Null else pl.col(hp))
    for metric in METRICS:
        present = metric in runs.columns
        columns.append((pl.col(metric) if present else pl.lit(None)).cast(pl.Float64).alias(metric))
    wall = pl.col(WALL_SECONDS) if WALL_SECONDS in runs.columns else pl.lit(None)
    columns.append(wall.cast(pl.Float64).alias(WALL_SECONDS))
    failed = pl.col(FAILED_CHECKS) if FAILED_CHECKS in runs.columns else pl.lit([], dtype=pl.List(pl.String))
    columns.append(failed.cast(pl.List(pl.String)).fill_null([]).alias(FAILED_CHECKS))
    return runs.select(columns)


def _failed(table: pl.DataFrame) -> pl.DataFrame:
    """Rows whose blocking checks failed, by key."""
    return table.filter(pl.col(FAILED_CHECKS).list.len() > 0).sort("key")


def _passing(table: pl.DataFrame) -> pl.DataFrame:
    return table.filter(pl.col(FAILED_CHECKS).list.len() == 0)


def _finite(series: pl.Series) -> pl.Series:
    """The series as Float64 with non-finite values turned into nulls."""
    values = series.cast(pl.Float64)
    return pl.select(pl.when(values.is_finite()).then(values)).to_series().alias(series.name)


def _worst_if_not_finite(column: str) -> pl.Expr:
    """The column with NaN/±inf replaced by +inf (worst when minimising); nulls stay null."""
    col = pl.col(column).cast(pl.Float64)
    return pl.when(col.is_null()).then(None).when(col.is_finite()).then(col).otherwise(float("inf"))


def _normalised_rank(series: pl.Series) -> pl.Series:
    ranks = _finite(series).rank("average").cast(pl.Float64)
    low, high = ranks.min(), ranks.max()
    scaled = (ranks - low) / (high - low) if high > low else ranks * 0.0
    return scaled.fill_null(1.0)


def _varying(frame: pl.DataFrame) -> list[str]:
    present = (hp for hp in HYPERPARAMETERS if hp in frame.columns)
    return [hp for hp in present if frame.get_column(hp).drop_nulls().n_unique() > 1]


def _constant(frame: pl.DataFrame) -> dict[str, object]:
    """Hyperparameters with exactly one distinct non-null value, and that value."""
    values = {hp: frame.get_column(hp).drop_nulls().unique() for hp in HYPERPARAMETERS if hp in frame.columns}
    return {hp: unique[0] for hp, unique in values.items() if unique.len() == 1}


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if x.size < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denominator if denominator > 0 else None


def _effect_row(frame: pl.DataFrame, hp: str, metric: str) -> dict[str, object] | None:
    data = frame.select(pl.col(hp), _worst_if_not_finite(metric).alias("_m")).drop_nulls()
    if data.height == 0:
        return None
    means = data.group_by(hp).agg(pl.col("_m").mean()).sort("_m", hp)
    correlation = None
    if frame.schema[hp].is_numeric():
        pairs = data.filter(pl.col("_m").is_finite())
        x = pairs.get_column(hp).cast(pl.Float64).to_numpy()
        correlation = _pearson(x, pairs.get_column("_m").to_numpy())
    best, worst = means.row(0), means.row(-1)
    return {
        "hyperparameter": hp,
        "correlation": correlation,
        "best_value": _fmt(best[0]),
        "best_mean": best[1],
        "worst_value": _fmt(worst[0]),
        "worst_mean": worst[1],
        "n_values": frame.get_column(hp).drop_nulls().n_unique(),
    }


def _ranked_by(table: pl.DataFrame, metric: str) -> pl.DataFrame:
    """Configs with a non-null `metric`, best (lowest) first, non-finite last, ties broken by key."""
    return (
        table.filter(pl.col(metric).is_not_null())
        .with_columns(_worst_if_not_finite(metric).alias("_rank"))
        .sort("_rank", "key")
        .drop("_rank")
    )


def _ranked_balanced(table: pl.DataFrame) -> pl.DataFrame:
    return table.filter(pl.col("balanced_score").is_not_null()).sort("balanced_score", "key")


# --- plot ------------------------------------------------------------------------------------------------


def _write_plot(table: pl.DataFrame, path: Path, sweep_name: str) -> Path | None:
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
    failed, passing = _failed(points), _passing(points)
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
    """Name each point by its config key, in small type beside it; neighbours in L0 order alternate above and
    below so that keys of close points do not print over each other."""
    ordered = points.sort("l0", "fvu", "key")
    for i, row in enumerate(ordered.iter_rows(named=True)):
        on_front = bool(row["on_pareto_front"])
        ax.annotate(row["key"], (row["l0"], row["fvu"]), xytext=(5, 6 if i % 2 == 0 else -10),
                    textcoords="offset points", fontsize=6.5, color="C3" if on_front else "0.25",
                    fontweight="bold" if on_front else "normal")


# --- markdown --------------------------------------------------------------------------------------------


def _fmt(value: object) -> str:
    """4 significant digits for floats, NaN/inf spelled out, — for null."""
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    return str(value)


def _duration(seconds: float | None) -> str:
    return "—" if seconds is None else format_duration(seconds)


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _present_metrics(table: pl.DataFrame, candidates: Sequence[str]) -> list[str]:
    return [m for m in candidates if m in table.columns and table.get_column(m).null_count() < table.height]


def _config_table(ranked: pl.DataFrame, table: pl.DataFrame, with_score: bool = False) -> str:
    """Markdown rows of `ranked`: rank, key, the sweep's varying hyperparameters, the headline metrics."""
    columns = _varying(table) + _present_metrics(table, SHOWN_METRICS)
    if with_score:
        columns.append("balanced_score")
    timed = table.get_column(WALL_SECONDS).null_count() < table.height
    rows = [
        [str(i), f"`{row['key']}`", *(_fmt(row[c]) for c in columns),
         *([_duration(row[WALL_SECONDS])] if timed else [])]
        for i, row in enumerate(ranked.iter_rows(named=True), start=1)
    ]
    return _md_table(["#", "key", *columns, *(["wall time"] if timed else [])], rows)


def _render_report(
    table: pl.DataFrame, sweep_name: str, missing: list[str], front: list[str], plot_path: Path | None
) -> str:
    sections = [_header(table, sweep_name, missing)]
    if _failed(table).height:
        sections.append(_failed_section(table))
    if table.height:
        passing = _passing(table)
        sections += [
            _summary_section(passing, _failed(table).height),
            _effects_section(passing),
            _best_section(passing),
            _pareto_section(table, front, plot_path),
            _recommendations_section(table, front),
        ]
    return "\n\n".join(sections) + "\n"


def _header(table: pl.DataFrame, sweep_name: str, missing: list[str]) -> str:
    lines = [
        f"# Sweep report: {sweep_name}",
        "",
        f"- Registered configurations: {table.height + len(missing)}",
        f"- Completed: {table.height}",
        f"- Missing (registered, not yet materialised): {len(missing)}"
        + (": " + ", ".join(f"`{key}`" for key in sorted(missing)) if missing else ""),
        f"- Failed blocking checks (listed with the reasons; left out of every statistic, correlation and "
        f"ranking): {_failed(table).height}",
    ]
    wall = table.get_column(WALL_SECONDS).drop_nulls()
    if wall.len():
        lines.append(f"- Training wall time: {format_duration(float(wall.sum()))} over {wall.len()} run(s); per run "
                     f"median {format_duration(float(wall.median()))}, max {format_duration(float(wall.max()))}")
    constant = _constant(table)
    if constant:
        fixed = ", ".join(f"{hp}={_fmt(value)}" for hp, value in constant.items())
        lines.append(f"- Fixed across finished runs: {fixed}")
    if not table.height:
        lines += ["", "No configuration has finished yet; there is nothing to analyse."]
    return "\n".join(lines)


def _failed_section(table: pl.DataFrame) -> str:
    """Which finished runs failed a blocking check, and why (their verdicts' descriptions)."""
    lines = ["## Failed blocking checks", "",
             "These runs finished but a blocking (ERROR) quality check failed, so their metrics do not describe a "
             "usable SAE: they are left out of every statistic, correlation, top-10, Pareto front and "
             "recommendation below.", ""]
    for row in _failed(table).iter_rows(named=True):
        lines.append(f"- `{row['key']}`: " + "; ".join(row[FAILED_CHECKS]))
    return "\n".join(lines)


def _summary_section(table: pl.DataFrame, n_failed: int) -> str:
    """Statistics over the runs that passed their blocking checks (`table`); `n_failed` more were left out."""
    rows = []
    for metric in _present_metrics(table, METRICS):
        finite = _finite(table.get_column(metric)).drop_nulls()
        non_finite = table.get_column(metric).drop_nulls().len() - finite.len()
        stats = [finite.mean(), finite.median(), finite.std(), finite.min(), finite.max()]
        cells = [_fmt(None if v is None else float(v)) for v in stats]
        rows.append([metric, str(finite.len()), *cells, str(non_finite)])
    body = _md_table(["metric", "n finite", "mean", "median", "std", "min", "max", "non-finite"], rows)
    runs = "1 run" if table.height == 1 else f"{table.height} runs"
    left_out = f" ({n_failed} that failed blocking checks left out)" if n_failed else ""
    note = (f"Over {runs} that passed their blocking checks{left_out}; over finite values: null (not measured) "
            "values are excluded, non-finite ones counted.")
    return "## Summary statistics\n\n" + note + "\n\n" + body


def _effects_section(table: pl.DataFrame) -> str:
    parts = [
        "## Hyperparameter effects",
        "",
        "correlation: Pearson r between the numeric hyperparameter value and the metric over the finished runs "
        "that passed their blocking checks "
        "(— for categorical ones or without variance). best / worst: the value with the lowest / highest "
        "mean of the metric (non-finite values count as inf). Hyperparameters constant across the sweep "
        "are omitted.",
    ]
    for metric in _present_metrics(table, EFFECT_METRICS):
        lower = "lower = sparser" if metric == "l0" else "lower is better"
        parts += ["", f"### {metric} ({lower})", ""]
        effects = hyperparameter_effects(table, metric)
        if effects.height == 0:
            parts.append("No hyperparameter varies across the finished runs.")
            continue
        rows = [
            [
                row["hyperparameter"],
                _fmt(row["correlation"]),
                f"{row['best_value']} ({_fmt(row['best_mean'])})",
                f"{row['worst_value']} ({_fmt(row['worst_mean'])})",
                str(row["n_values"]),
            ]
            for row in effects.iter_rows(named=True)
        ]
        parts.append(_md_table(["hyperparameter", "correlation", "best (value, mean)", "worst (value, mean)",
                                "values"], rows))
    return "\n".join(parts)


def _best_section(table: pl.DataFrame) -> str:
    parts = ["## Best configurations"]
    for metric, title in (("dead_fraction", "lowest dead_fraction"), ("fvu", "lowest FVU")):
        parts += ["", f"### Top {TOP_N}: {title}", ""]
        ranked = _ranked_by(table, metric)
        parts.append(
            _config_table(ranked.head(TOP_N), table) if ranked.height else f"No run reports {metric}."
        )
    parts += ["", f"### Top {TOP_N}: balanced", "", "Balanced score: " + BALANCED_SCORE_FORMULA, ""]
    ranked = _ranked_balanced(table)
    parts.append(
        _config_table(ranked.head(TOP_N), table, with_score=True) if ranked.height
        else "No run reports dead_fraction or fvu, so no balanced score."
    )
    return "\n".join(parts)


def _pareto_section(table: pl.DataFrame, front: list[str], plot_path: Path | None) -> str:
    parts = [
        "## Pareto front (L0 vs FVU)",
        "",
        "Configs not dominated: no other config has L0 and FVU both lower or equal, one strictly lower "
        "(runs with a null or non-finite L0 or FVU are left out).",
        "",
    ]
    if front:
        on_front = table.filter(pl.col("on_pareto_front")).sort("l0", "fvu", "key")
        rows = [[f"`{r['key']}`", _fmt(r["l0"]), _fmt(r["fvu"]), _fmt(r["dead_fraction"])]
                for r in on_front.iter_rows(named=True)]
        parts.append(_md_table(["key", "l0", "fvu", "dead_fraction"], rows))
    else:
        parts.append("No run reports both a finite l0 and a finite fvu.")
    if plot_path is not None:
        parts += ["", f"![L0 vs FVU]({plot_path.name})"]
    return "\n".join(parts)


def _describe(row: dict[str, object]) -> str:
    return ", ".join(f"{m}={_fmt(row[m])}" for m in SHOWN_METRICS if row[m] is not None)


def _recommendations_section(table: pl.DataFrame, front: list[str]) -> str:
    excluded = _failed(table).get_column("key").to_list()
    table = _passing(table)
    runs = "1 finished run shows" if table.height == 1 else f"{table.height} finished runs show"
    lines = ["## Recommendations", "", f"What the {runs}" + (" that passed their blocking checks" if excluded
                                                               else "") + ":", ""]
    if excluded:
        lines.append(f"- Not considered (failed blocking checks): {', '.join(f'`{key}`' for key in excluded)}.")
    ranked = _ranked_balanced(table)
    if ranked.height:
        best = ranked.row(0, named=True)
        where = "on" if best["key"] in front else "not on"
        lines.append(f"- Best balanced configuration: `{best['key']}` ({_describe(best)}, balanced score "
                     f"{_fmt(best['balanced_score'])}); it is {where} the L0–FVU Pareto front.")
    for metric, label in (("fvu", "Lowest FVU"), ("dead_fraction", "Lowest dead_fraction")):
        by_metric = _ranked_by(table, metric)
        if by_metric.height:
            top = by_metric.row(0, named=True)
            lines.append(f"- {label}: `{top['key']}` ({_describe(top)}).")
    effects = hyperparameter_effects(table, "balanced_score")
    if effects.height:
        lines.append("- Value with the lowest mean balanced score, per varying hyperparameter:")
        lines += [
            f"  - {r['hyperparameter']}: {r['best_value']} (mean {_fmt(r['best_mean'])}; "
            f"worst {r['worst_value']}, mean {_fmt(r['worst_mean'])})"
            for r in effects.iter_rows(named=True)
        ]
    elif table.height > 1:
        lines.append("- No hyperparameter varies across the finished runs, so no per-value comparison.")
    elif table.height == 1:
        lines.append("- Only one configuration has finished; no comparison is possible yet.")
    else:
        lines.append("- No finished run passed its blocking checks; there is nothing to recommend.")
    diverged = table.filter(pl.col("fvu").is_not_null() & ~pl.col("fvu").is_finite()).get_column("key")
    if diverged.len():
        keys = ", ".join(f"`{key}`" for key in diverged)
        lines.append(f"- Non-finite FVU (diverged; ranked worst): {keys}.")
    if effects.height:
        lines.append("- Per-value means are associations over the finished runs, not controlled comparisons: "
                     "hyperparameters vary jointly, so a value's mean also reflects what it was paired with.")
    return "\n".join(lines)


# --- seed-004 additions: L0 vs dead front, trade-offs, box plots, overlaid training curves ----------------


def trade_offs(table: pl.DataFrame) -> pl.DataFrame:
    """One row per varying numeric hyperparameter: the sign of its correlation with dead_fraction, fvu and l0
    ("higher -> higher", "higher -> lower", or "none" when r is null or |r| < 0.1), and the value with the lowest
    mean balanced score (the recommendation)."""
    rows = []
    effects = {m: hyperparameter_effects(table, m) for m in ("dead_fraction", "fvu", "l0", "balanced_score")}
    for hp in _varying(table):
        if not table.schema[hp].is_numeric():
            continue
        row: dict[str, object] = {"hyperparameter": hp}
        for metric in ("dead_fraction", "fvu", "l0"):
            found = effects[metric].filter(pl.col("hyperparameter") == hp)
            r = found.get_column("correlation")[0] if found.height else None
            row[f"{metric}_r"] = r
            row[f"effect_on_{metric}"] = ("none" if r is None or abs(r) < 0.1
                                          else "higher -> higher" if r > 0 else "higher -> lower")
        best = effects["balanced_score"].filter(pl.col("hyperparameter") == hp)
        row["recommended"] = best.get_column("best_value")[0] if best.height else None
        rows.append(row)
    schema = {"hyperparameter": pl.String(), **{c: t for m in ("dead_fraction", "fvu", "l0")
                                                 for c, t in ((f"{m}_r", pl.Float64()),
                                                              (f"effect_on_{m}", pl.String()))},
              "recommended": pl.String()}
    return pl.DataFrame(rows, schema=schema, orient="row")


def _append_sections(report: str, table: pl.DataFrame, front_dead: list[str], box_path: Path | None,
                     curves_path: Path | None) -> str:
    if not table.height:
        return report
    parts = ["## Pareto front (L0 vs dead fraction)", "",
             "Configs for which no other config has both a lower-or-equal L0 and dead_fraction, one strictly lower.",
             ""]
    if front_dead:
        on_front = table.filter(pl.col("on_pareto_front_dead")).sort("l0", "dead_fraction", "key")
        parts.append(_md_table(["key", "l0", "dead_fraction", "fvu"],
                               [[f"`{r['key']}`", _fmt(r["l0"]), _fmt(r["dead_fraction"]), _fmt(r["fvu"])]
                                for r in on_front.iter_rows(named=True)]))
    else:
        parts.append("No run reports both a finite l0 and a finite dead_fraction.")
    parts += ["", "## Trade-offs", "",
              "Sign of the Pearson correlation of each numeric hyperparameter with each metric over the finished "
              "runs that passed their blocking checks (|r| < 0.1 counts as none); recommended: the value with the "
              "lowest mean balanced score.", ""]
    passing = _passing(table)
    offs = trade_offs(passing.with_columns(balanced_scores(passing)) if "balanced_score" not in passing.columns
                      else passing)
    if offs.height:
        parts.append(_md_table(["hyperparameter", "dead_fraction", "fvu", "l0", "recommended"], [
            [r["hyperparameter"], f"{r['effect_on_dead_fraction']} (r={_fmt(r['dead_fraction_r'])})",
             f"{r['effect_on_fvu']} (r={_fmt(r['fvu_r'])})", f"{r['effect_on_l0']} (r={_fmt(r['l0_r'])})",
             str(r["recommended"])] for r in offs.iter_rows(named=True)]))
    else:
        parts.append("No numeric hyperparameter varies across the finished runs.")
    if box_path is not None:
        parts += ["", "## Per-hyperparameter distributions", "", f"![box plots]({box_path.name})"]
    if curves_path is not None:
        parts += ["", f"## Training curves of the top {CURVES_TOP_N} balanced configs", "",
                  f"![training curves]({curves_path.name})"]
    return report.rstrip("\n") + "\n\n" + "\n".join(parts) + "\n"


def _write_box_plots(table: pl.DataFrame, path: Path) -> Path | None:
    """One row of panels per varying hyperparameter: dead_fraction and fvu per value (finite values only)."""
    hps = _varying(table)
    metrics = [m for m in ("dead_fraction", "fvu") if _finite(table.get_column(m)).drop_nulls().len()]
    if not hps or not metrics:
        path.unlink(missing_ok=True)
        return None
    fig = Figure(figsize=(4 * len(metrics), 2.6 * len(hps)), dpi=90)
    axes = fig.subplots(len(hps), len(metrics), squeeze=False)
    for row, hp in enumerate(hps):
        values = sorted(table.get_column(hp).drop_nulls().unique().to_list())
        for col, metric in enumerate(metrics):
            data = [_finite(table.filter(pl.col(hp) == v).get_column(metric)).drop_nulls().to_list() for v in values]
            ax = axes[row][col]
            ax.boxplot([d if d else [float("nan")] for d in data], tick_labels=[_fmt(v) for v in values])
            ax.set_xlabel(hp)
            ax.set_ylabel(metric)
            if metric == "fvu":
                finite = [x for d in data for x in d]
                if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
                    ax.set_yscale("log")
    write_bytes_atomic(path, figure_png(fig))
    return path


def _write_curves(logs: Mapping[str, pl.DataFrame], keys: Sequence[str], path: Path) -> Path | None:
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
