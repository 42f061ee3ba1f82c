"""The sweep's table: finished runs prepared into one frame, ranked, their Pareto fronts, balanced scores,
hyperparameter effects and trade-offs (what the sweep report in `analysis.py` writes out)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from sae_pipeline.evaluation import REPORTED_METRICS, REPORTED_TASK_METRICS
from sae_pipeline.markdown import format_value
from sae_pipeline.saes.registry import sparsity_fields

HYPERPARAMETERS: tuple[str, ...] = (
    "architecture", "expansion_factor", *sparsity_fields(), "lr", "aux_coeff", "batch_size", "train_tokens",
)
"""Config fields the report tabulates: every registered architecture's sparsity field among them."""
DOWNSTREAM_METRICS: tuple[str, ...] = ("downstream_recovered", "downstream_kl")
"""From summary.json's `downstream`: the loss (or embedding) recovered with the SAE spliced in, and for a causal LM
the KL divergence of its next-token distribution from the clean model's."""
METRICS: tuple[str, ...] = (
    *REPORTED_METRICS, *DOWNSTREAM_METRICS, *REPORTED_TASK_METRICS, "final_loss", "train_l0_last_window",
    "train_dead_fraction_last_window",
)
"""Held-out metrics (summary.json: reconstruction, downstream, real tasks), then last-window means of training
metrics (second half of metrics.parquet)."""
BALANCE_METRICS: tuple[str, ...] = ("dead_fraction", "fvu")
EFFECT_METRICS: tuple[str, ...] = ("dead_fraction", "fvu", "l0")
FAILED_CHECKS = "failed_checks"
"""Column of `runs`: the run's failed blocking checks as `name: description` strings (empty: it passed)."""
WALL_SECONDS = "wall_seconds"
"""Column of `runs`: the run's training wall time in seconds (summary.json); shown as a duration."""
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
        if m in frame.columns and finite_values(frame.get_column(m)).drop_nulls().len() > 0
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
        for hp in varying_hyperparameters(frame):
            row = _effect_row(frame, hp, metric)
            if row is not None:
                rows.append(row)
    return pl.DataFrame(rows, schema=_EFFECTS_SCHEMA, orient="row")


def prepare_table(runs: pl.DataFrame) -> pl.DataFrame:
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


def failed_rows(table: pl.DataFrame) -> pl.DataFrame:
    """Rows whose blocking checks failed, by key."""
    return table.filter(pl.col(FAILED_CHECKS).list.len() > 0).sort("key")


def passing_rows(table: pl.DataFrame) -> pl.DataFrame:
    return table.filter(pl.col(FAILED_CHECKS).list.len() == 0)


def finite_values(series: pl.Series) -> pl.Series:
    """The series as Float64 with non-finite values turned into nulls."""
    values = series.cast(pl.Float64)
    return pl.select(pl.when(values.is_finite()).then(values)).to_series().alias(series.name)


def _worst_if_not_finite(column: str) -> pl.Expr:
    """The column with NaN/±inf replaced by +inf (worst when minimising); nulls stay null."""
    col = pl.col(column).cast(pl.Float64)
    return pl.when(col.is_null()).then(None).when(col.is_finite()).then(col).otherwise(float("inf"))


def _normalised_rank(series: pl.Series) -> pl.Series:
    ranks = finite_values(series).rank("average").cast(pl.Float64)
    low, high = ranks.min(), ranks.max()
    scaled = (ranks - low) / (high - low) if high > low else ranks * 0.0
    return scaled.fill_null(1.0)


def varying_hyperparameters(frame: pl.DataFrame) -> list[str]:
    present = (hp for hp in HYPERPARAMETERS if hp in frame.columns)
    return [hp for hp in present if frame.get_column(hp).drop_nulls().n_unique() > 1]


def constant_hyperparameters(frame: pl.DataFrame) -> dict[str, object]:
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
        "best_value": format_value(best[0]),
        "best_mean": best[1],
        "worst_value": format_value(worst[0]),
        "worst_mean": worst[1],
        "n_values": frame.get_column(hp).drop_nulls().n_unique(),
    }


def ranked_by(table: pl.DataFrame, metric: str) -> pl.DataFrame:
    """Configs with a non-null `metric`, best (lowest) first, non-finite last, ties broken by key."""
    return (
        table.filter(pl.col(metric).is_not_null())
        .with_columns(_worst_if_not_finite(metric).alias("_rank"))
        .sort("_rank", "key")
        .drop("_rank")
    )


def ranked_balanced(table: pl.DataFrame) -> pl.DataFrame:
    return table.filter(pl.col("balanced_score").is_not_null()).sort("balanced_score", "key")


def trade_offs(table: pl.DataFrame) -> pl.DataFrame:
    """One row per varying numeric hyperparameter: the sign of its correlation with dead_fraction, fvu and l0
    ("higher -> higher", "higher -> lower", or "none" when r is null or |r| < 0.1), and the value with the lowest
    mean balanced score (the recommendation)."""
    rows = []
    effects = {m: hyperparameter_effects(table, m) for m in ("dead_fraction", "fvu", "l0", "balanced_score")}
    for hp in varying_hyperparameters(table):
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
