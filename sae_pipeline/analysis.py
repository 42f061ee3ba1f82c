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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import polars as pl

from sae_pipeline.consistency import consistency_by_group, seed_consistency, seed_consistency_section
from sae_pipeline.markdown import format_duration, format_value
from sae_pipeline.plots import png_data_uri
from sae_pipeline.storage import write_bytes_atomic
from sae_pipeline.sweep_plots import (
    BOX_PLOT_NAME,
    CURVES_PLOT_NAME,
    PLOT_NAME,
    write_box_plots,
    write_curves,
    write_l0_fvu_plot,
)
from sae_pipeline.sweep_stats import (
    BALANCED_SCORE_FORMULA,
    EFFECT_METRICS,
    FAILED_CHECKS,
    METRICS,
    WALL_SECONDS,
    balanced_scores,
    constant_hyperparameters,
    failed_rows,
    finite_values,
    hyperparameter_effects,
    pareto_front,
    passing_rows,
    prepare_table,
    ranked_balanced,
    ranked_by,
    trade_offs,
    varying_hyperparameters,
)
from sae_pipeline.task_report import PROBING_PLOT_NAME, task_sections, write_probing_plot

SHOWN_METRICS: tuple[str, ...] = ("dead_fraction", "fvu", "l0")
COMPACT_METRICS: tuple[str, ...] = ("l0", "fvu", "dead_fraction")
"""The headline metrics of a compact table, in its order, after the one it ranks by."""
COUNTS_NOTE = "The counts of finite and non-finite values are in report.md."
"""What a compact summary table says it leaves out."""
TOP_N = 10
TOP_SUMMARY_N = 5
REPORT_NAME = "report.md"
TABLE_NAME = "metrics.parquet"
CURVES_TOP_N = 5


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
    probing_plot_path: Path | None = None
    seed_consistency: dict[str, dict] = field(default_factory=dict)
    """Group (a config at seed 0) -> its cross-seed figures (`consistency.seed_consistency`); empty without
    seed siblings."""
    pareto_dead: tuple[str, ...] = ()
    """Keys on the L0 vs dead-fraction Pareto front."""
    failed: tuple[str, ...] = ()
    """Keys whose blocking checks failed (kept off the fronts and the recommendations)."""
    ui_markdown: str = ""
    """The report as the UI shows it (`ReportView`), its plots still linked by file name."""


@dataclass(frozen=True)
class ReportView:
    """How a rendition of the report names and judges configs. report.md's (the default): every column, each
    config by its key. The UI's (`compact`): tables of at most 7 columns (`check_matrix.UI_COLUMNS`: a config's
    label, the metric ranked by, L0, FVU, dead fraction, its worst check verdict), each config by its short
    label, whose key the check matrix's key table gives."""

    compact: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    verdicts: Mapping[str, str] = field(default_factory=dict)
    check_matrix: str = ""
    imported: frozenset[str] = frozenset()
    """Keys of imported SAEs (evaluated as they are, not trained here): their names say so."""

    def name(self, key: str) -> str:
        shown = self.labels[key] if self.compact and key in self.labels else f"`{key}`"
        return f"{shown} (imported)" if key in self.imported else shown


def build_sweep_report(
    runs: pl.DataFrame, out_dir: Path, sweep_name: str = "sweep", missing: Sequence[str] = (),
    training_logs: Mapping[str, pl.DataFrame] | None = None, check_matrix: str = "", ui: ReportView | None = None,
) -> SweepReport:
    """Write metrics.parquet, the PNGs and report.md into `out_dir`, each atomically (temp + rename).

    `runs` has one row per finished config: a `key` column and any of HYPERPARAMETERS and METRICS (absent
    columns are added as nulls, other columns are dropped). `missing`: keys registered but not materialised.
    `training_logs`: key -> metrics log (step/tokens + CURVE_COLUMNS); the top balanced configs' curves are
    overlaid in top_training_curves.png. `check_matrix` (`check_matrix.matrix_markdown`) opens the report,
    under its title. `ui`: the view of `ui_markdown` and `top_markdown` (default: report.md's). PNGs:
    l0_vs_fvu.png (scatter + front), hyperparameters.png (box plots of dead_fraction and fvu per value of each
    varying hyperparameter), top_training_curves.png, probing_vs_k.png (`task_report`, with the real-task
    sections, from the runs' absorption and probing columns). Runs with the
    `seed_group` and `sae_dir` columns of `results.collect_runs` add a cross-seed consistency section
    (`consistency.seed_consistency_section`; its figures also in `seed_consistency`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = prepare_table(runs)
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

    plot_path = write_l0_fvu_plot(table, out_dir / PLOT_NAME, sweep_name)
    ranked = ranked_balanced(table)
    box_path = write_box_plots(table, out_dir / BOX_PLOT_NAME)
    top_keys = ranked.get_column("key").head(CURVES_TOP_N).to_list()
    curves_path = write_curves(training_logs or {}, top_keys, out_dir / CURVES_PLOT_NAME)
    report_path = out_dir / REPORT_NAME
    imported = frozenset(runs.filter(pl.col("imported"))["key"]) if "imported" in runs.columns else frozenset()
    full = ReportView(check_matrix=check_matrix, imported=imported)
    ui = replace(ui, imported=imported) if ui else None
    shown = ui or full
    probing_path = write_probing_plot(runs, out_dir / PROBING_PLOT_NAME)
    consistency = seed_consistency(runs)
    texts = [_append_sections(_render_report(table, sweep_name, list(missing), front, plot_path, view), table,
                              front_dead, box_path, curves_path, view) + task_sections(runs, view.name, probing_path)
             + seed_consistency_section(consistency)
             for view in ([full, ui] if ui else [full])]
    write_bytes_atomic(report_path, texts[0].encode())

    return SweepReport(
        report_path=report_path,
        table_path=table_path,
        plot_path=plot_path,
        n_configs=table.height,
        best_balanced=ranked.get_column("key")[0] if ranked.height else None,
        top_markdown=_config_table(ranked.head(TOP_SUMMARY_N), table, shown, with_score=True)
        if ranked.height
        else "No finished configurations yet.",
        box_plot_path=box_path,
        curves_plot_path=curves_path,
        probing_plot_path=probing_path,
        seed_consistency=consistency_by_group(consistency),
        pareto_dead=tuple(front_dead),
        failed=tuple(failed_rows(table).get_column("key").to_list()),
        ui_markdown=texts[-1],
    )


def report_with_inline_plots(report: SweepReport) -> str:
    """The UI's rendition of the report (report.md's without a `ReportView`) with each plot it links embedded as
    a data URI, so the report reads whole where it is shown without its folder (Dagster metadata); the file on
    disk keeps plain links to the PNGs beside it."""
    text = report.ui_markdown
    for plot in (report.plot_path, report.box_plot_path, report.curves_plot_path, report.probing_plot_path):
        if plot is not None:
            text = text.replace(f"]({plot.name})", f"]({png_data_uri(plot.read_bytes())})")
    return text


# --- markdown --------------------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    return "—" if seconds is None else format_duration(seconds)


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _present_metrics(table: pl.DataFrame, candidates: Sequence[str]) -> list[str]:
    return [m for m in candidates if m in table.columns and table.get_column(m).null_count() < table.height]


def _config_table(ranked: pl.DataFrame, table: pl.DataFrame, view: ReportView, with_score: bool = False,
                  ranked_by_metric: str = "balanced_score") -> str:
    """Markdown rows of `ranked`: rank, key, the sweep's varying hyperparameters, the headline metrics (in a
    compact view: rank, label, the metric ranked by, the other headline metrics, the worst verdict)."""
    if view.compact:
        metrics = _present_metrics(table, [ranked_by_metric, *(m for m in COMPACT_METRICS if m != ranked_by_metric)])
        rows = [[str(i), view.name(row["key"]), *(format_value(row[m]) for m in metrics),
                 view.verdicts.get(row["key"], "–")] for i, row in enumerate(ranked.iter_rows(named=True), start=1)]
        return _md_table(["#", "config", *metrics, "verdict"], rows)
    columns = varying_hyperparameters(table) + _present_metrics(table, SHOWN_METRICS)
    if with_score:
        columns.append("balanced_score")
    timed = table.get_column(WALL_SECONDS).null_count() < table.height
    rows = [
        [str(i), view.name(row["key"]), *(format_value(row[c]) for c in columns),
         *([_duration(row[WALL_SECONDS])] if timed else [])]
        for i, row in enumerate(ranked.iter_rows(named=True), start=1)
    ]
    return _md_table(["#", "key", *columns, *(["wall time"] if timed else [])], rows)


def _render_report(
    table: pl.DataFrame, sweep_name: str, missing: list[str], front: list[str], plot_path: Path | None,
    view: ReportView,
) -> str:
    sections = [_header(table, sweep_name, missing, view)]
    if failed_rows(table).height:
        sections.append(_failed_section(table))
    if table.height:
        passing = passing_rows(table)
        sections += [
            _summary_section(passing, failed_rows(table).height, view),
            _effects_section(passing),
            _best_section(passing, view),
            _pareto_section(table, front, plot_path, view),
            _recommendations_section(table, front),
        ]
    return "\n\n".join(sections) + "\n"


def _header(table: pl.DataFrame, sweep_name: str, missing: list[str], view: ReportView) -> str:
    lines = [
        f"# Sweep report: {sweep_name}",
        "",
        *([view.check_matrix, ""] if view.check_matrix else []),
        f"- Registered configurations: {table.height + len(missing)}",
        f"- Completed: {table.height}",
        f"- Missing (registered, not yet materialised): {len(missing)}"
        + (": " + ", ".join(f"`{key}`" for key in sorted(missing)) if missing else ""),
        f"- Failed blocking checks (listed with the reasons; left out of every statistic, correlation and "
        f"ranking): {failed_rows(table).height}",
        *(["- Imported SAEs (evaluated as they are, not trained here; marked `(imported)`): "
           + ", ".join(f"`{key}`" for key in sorted(view.imported))] if view.imported else []),
    ]
    wall = table.get_column(WALL_SECONDS).drop_nulls()
    if wall.len():
        lines.append(f"- Training wall time: {format_duration(float(wall.sum()))} over {wall.len()} run(s); per run "
                     f"median {format_duration(float(wall.median()))}, max {format_duration(float(wall.max()))}")
    constant = constant_hyperparameters(table)
    if constant:
        fixed = ", ".join(f"{hp}={format_value(value)}" for hp, value in constant.items())
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
    for row in failed_rows(table).iter_rows(named=True):
        lines.append(f"- `{row['key']}`: " + "; ".join(row[FAILED_CHECKS]))
    return "\n".join(lines)


def _summary_section(table: pl.DataFrame, n_failed: int, view: ReportView) -> str:
    """Statistics over the runs that passed their blocking checks (`table`); `n_failed` more were left out. A
    compact view leaves the counts of finite and non-finite values to report.md."""
    rows = []
    for metric in _present_metrics(table, METRICS):
        finite = finite_values(table.get_column(metric)).drop_nulls()
        non_finite = table.get_column(metric).drop_nulls().len() - finite.len()
        stats = [finite.mean(), finite.median(), finite.std(), finite.min(), finite.max()]
        cells = [format_value(None if v is None else float(v)) for v in stats]
        rows.append([metric, *cells] if view.compact else [metric, str(finite.len()), *cells, str(non_finite)])
    headers = ["metric", "mean", "median", "std", "min", "max"]
    body = _md_table(headers if view.compact else [*headers[:1], "n finite", *headers[1:], "non-finite"], rows)
    runs = "1 run" if table.height == 1 else f"{table.height} runs"
    left_out = f" ({n_failed} that failed blocking checks left out)" if n_failed else ""
    note = (f"Over {runs} that passed their blocking checks{left_out}; over finite values: null (not measured) "
            "values are excluded, non-finite ones counted.")
    return "## Summary statistics\n\n" + note + "\n\n" + (COUNTS_NOTE + "\n\n" if view.compact else "") + body


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
                format_value(row["correlation"]),
                f"{row['best_value']} ({format_value(row['best_mean'])})",
                f"{row['worst_value']} ({format_value(row['worst_mean'])})",
                str(row["n_values"]),
            ]
            for row in effects.iter_rows(named=True)
        ]
        parts.append(_md_table(["hyperparameter", "correlation", "best (value, mean)", "worst (value, mean)",
                                "values"], rows))
    return "\n".join(parts)


def _best_section(table: pl.DataFrame, view: ReportView) -> str:
    parts = ["## Best configurations"]
    for metric, title in (("dead_fraction", "lowest dead_fraction"), ("fvu", "lowest FVU")):
        parts += ["", f"### Top {TOP_N}: {title}", ""]
        ranked = ranked_by(table, metric)
        parts.append(
            _config_table(ranked.head(TOP_N), table, view, ranked_by_metric=metric) if ranked.height
            else f"No run reports {metric}."
        )
    parts += ["", f"### Top {TOP_N}: balanced", "", "Balanced score: " + BALANCED_SCORE_FORMULA, ""]
    ranked = ranked_balanced(table)
    parts.append(
        _config_table(ranked.head(TOP_N), table, view, with_score=True) if ranked.height
        else "No run reports dead_fraction or fvu, so no balanced score."
    )
    return "\n".join(parts)


def _pareto_section(table: pl.DataFrame, front: list[str], plot_path: Path | None, view: ReportView) -> str:
    parts = [
        "## Pareto front (L0 vs FVU)",
        "",
        "Configs not dominated: no other config has L0 and FVU both lower or equal, one strictly lower "
        "(runs with a null or non-finite L0 or FVU are left out).",
        "",
    ]
    if front:
        on_front = table.filter(pl.col("on_pareto_front")).sort("l0", "fvu", "key")
        rows = [[view.name(r["key"]), format_value(r["l0"]), format_value(r["fvu"]), format_value(r["dead_fraction"])]
                for r in on_front.iter_rows(named=True)]
        parts.append(_md_table(["config" if view.compact else "key", "l0", "fvu", "dead_fraction"], rows))
    else:
        parts.append("No run reports both a finite l0 and a finite fvu.")
    if plot_path is not None:
        parts += ["", f"![L0 vs FVU]({plot_path.name})"]
    return "\n".join(parts)


def _describe(row: dict[str, object]) -> str:
    return ", ".join(f"{m}={format_value(row[m])}" for m in SHOWN_METRICS if row[m] is not None)


def _recommendations_section(table: pl.DataFrame, front: list[str]) -> str:
    excluded = failed_rows(table).get_column("key").to_list()
    table = passing_rows(table)
    runs = "1 finished run shows" if table.height == 1 else f"{table.height} finished runs show"
    lines = ["## Recommendations", "", f"What the {runs}" + (" that passed their blocking checks" if excluded
                                                               else "") + ":", ""]
    if excluded:
        lines.append(f"- Not considered (failed blocking checks): {', '.join(f'`{key}`' for key in excluded)}.")
    ranked = ranked_balanced(table)
    if ranked.height:
        best = ranked.row(0, named=True)
        where = "on" if best["key"] in front else "not on"
        lines.append(f"- Best balanced configuration: `{best['key']}` ({_describe(best)}, balanced score "
                     f"{format_value(best['balanced_score'])}); it is {where} the L0–FVU Pareto front.")
    for metric, label in (("fvu", "Lowest FVU"), ("dead_fraction", "Lowest dead_fraction")):
        by_metric = ranked_by(table, metric)
        if by_metric.height:
            top = by_metric.row(0, named=True)
            lines.append(f"- {label}: `{top['key']}` ({_describe(top)}).")
    effects = hyperparameter_effects(table, "balanced_score")
    if effects.height:
        lines.append("- Value with the lowest mean balanced score, per varying hyperparameter:")
        lines += [
            f"  - {r['hyperparameter']}: {r['best_value']} (mean {format_value(r['best_mean'])}; "
            f"worst {r['worst_value']}, mean {format_value(r['worst_mean'])})"
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


# --- seed-004 additions: L0 vs dead front, trade-offs, box plots, overlaid training curves ---------------


def _append_sections(report: str, table: pl.DataFrame, front_dead: list[str], box_path: Path | None,
                     curves_path: Path | None, view: ReportView) -> str:
    if not table.height:
        return report
    parts = ["## Pareto front (L0 vs dead fraction)", "",
             "Configs for which no other config has both a lower-or-equal L0 and dead_fraction, one strictly lower.",
             ""]
    if front_dead:
        on_front = table.filter(pl.col("on_pareto_front_dead")).sort("l0", "dead_fraction", "key")
        parts.append(_md_table(["config" if view.compact else "key", "l0", "dead_fraction", "fvu"],
                               [[view.name(r["key"]), *(format_value(r[m]) for m in ("l0", "dead_fraction", "fvu"))]
                                for r in on_front.iter_rows(named=True)]))
    else:
        parts.append("No run reports both a finite l0 and a finite dead_fraction.")
    parts += ["", "## Trade-offs", "",
              "Sign of the Pearson correlation of each numeric hyperparameter with each metric over the finished "
              "runs that passed their blocking checks (|r| < 0.1 counts as none); recommended: the value with the "
              "lowest mean balanced score.", ""]
    passing = passing_rows(table)
    offs = trade_offs(passing.with_columns(balanced_scores(passing)) if "balanced_score" not in passing.columns
                      else passing)
    if offs.height:
        parts.append(_md_table(["hyperparameter", "dead_fraction", "fvu", "l0", "recommended"], [
            [r["hyperparameter"], f"{r['effect_on_dead_fraction']} (r={format_value(r['dead_fraction_r'])})",
             f"{r['effect_on_fvu']} (r={format_value(r['fvu_r'])})",
             f"{r['effect_on_l0']} (r={format_value(r['l0_r'])})",
             str(r["recommended"])] for r in offs.iter_rows(named=True)]))
    else:
        parts.append("No numeric hyperparameter varies across the finished runs.")
    if box_path is not None:
        parts += ["", "## Per-hyperparameter distributions", "", f"![box plots]({box_path.name})"]
    if curves_path is not None:
        parts += ["", f"## Training curves of the top {CURVES_TOP_N} balanced configs", "",
                  f"![training curves]({curves_path.name})"]
    return report.rstrip("\n") + "\n\n" + "\n".join(parts) + "\n"


