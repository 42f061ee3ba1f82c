"""Results of finished partitions: their summaries, training logs and failed checks, as the sweep report reads them."""

from __future__ import annotations

import json
from collections import Counter

import polars as pl

from sae_pipeline.config import ConfigError
from sae_pipeline.consistency import SAE_DIR, SEED_GROUP, seed_group
from sae_pipeline.evaluation import TASK_METRICS
from sae_pipeline.quality import VERDICT_FILE, blocking_failures
from sae_pipeline.saes.base import CFG_FILE, WEIGHTS_FILE
from sae_pipeline.spec_errors import parse_sae_config
from sae_pipeline.storage import Layout
from sae_pipeline.sweep_stats import FAILED_CHECKS, HYPERPARAMETERS, METRICS, WALL_SECONDS, last_window_mean

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.parquet"


def read_summary(layout: Layout, key: str) -> dict | None:
    """A finished partition's summary.json (held-out metrics and config), or None when it has none."""
    path = layout.pull(layout.sae_dir(key), SUMMARY_FILE) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else None


TRAIN_WINDOW_COLUMNS = {"train_l0_last_window": "l0", "train_dead_fraction_last_window": "dead_fraction"}
"""Columns added from each partition's metrics.parquet: the last-window mean (second half) of a training metric."""


def collect_runs(layout: Layout, keys: list[str], logs: dict[str, pl.DataFrame] | None = None
                 ) -> tuple[pl.DataFrame, list[str]]:
    """One row per finished partition; missing keys.

    A row holds the hyperparameters, the held-out metrics, every real-task figure (TASK_METRICS, from
    summary.json's `tasks`; null for a partition published before they existed), `final_loss` (the last-window
    mean of the training loss, from summary.json), `wall_seconds` (its training wall time), the last-window
    means of the training L0 and dead fraction from the partition's training log (`logs`, read with
    `training_logs` when not given; null when absent or empty), its failed blocking checks (`failed_checks`,
    from the verdicts; empty when it passed), its `seed` and SEED_GROUP, `imported` (whether its summary says
    it was imported), and, for configs finished with two or more seeds, SAE_DIR: the local folder of its saved
    weights (pulled only for those, for the cross-seed consistency section).
    """
    logs = training_logs(layout, keys) if logs is None else logs
    rows, missing = [], []
    for key in keys:
        summary = read_summary(layout, key)
        if summary is None:
            missing.append(key)
            continue
        hyper = {name: summary["config"].get(name) for name in HYPERPARAMETERS}
        metrics = {name: summary["metrics"].get(name) for name in METRICS if name in summary["metrics"]}
        metrics |= {f"downstream_{name}": value for name, value in summary.get("downstream", {}).items()
                    if f"downstream_{name}" in METRICS}
        metrics |= {name: summary.get("tasks", {}).get(name) for name in TASK_METRICS}
        window: dict[str, float | None] = dict.fromkeys(TRAIN_WINDOW_COLUMNS)
        log = logs.get(key)
        if log is not None and log.height:
            window = {name: last_window_mean(log, column) if column in log.columns else None
                      for name, column in TRAIN_WINDOW_COLUMNS.items()}
        rows.append({"key": key, **hyper, **metrics, "final_loss": summary["final_loss"], **window,
                     WALL_SECONDS: summary.get(WALL_SECONDS),
                     FAILED_CHECKS: failed_checks(layout, key), "seed": summary["config"].get("seed"),
                     "imported": "imported" in summary,
                     SEED_GROUP: _seed_group(summary["config"])})
    groups = Counter(row[SEED_GROUP] for row in rows if row[SEED_GROUP] is not None)
    for row in rows:
        siblings = groups[row[SEED_GROUP]] > 1  # a Counter counts None (never added) as 0
        row[SAE_DIR] = str(layout.pull(layout.sae_dir(row["key"]), CFG_FILE, WEIGHTS_FILE)) if siblings else None
    return pl.DataFrame(rows, infer_schema_length=None), missing


def _seed_group(config: dict) -> str | None:
    """The run's `seed_group`; None for a summary whose config no longer validates (written by an older version)."""
    try:
        return seed_group(parse_sae_config(config))
    except ConfigError:
        return None


def failed_checks(layout: Layout, key: str) -> list[str]:
    """The partition's failed blocking checks, from the verdicts of its `sae` and `features` folders."""
    folders = (layout.sae_dir(key), layout.features_dir(key))
    return [reason for folder in folders
            for reason in blocking_failures(layout.pull(folder, VERDICT_FILE), missing_ok=True)]


def training_logs(layout: Layout, keys: list[str]) -> dict[str, pl.DataFrame]:
    """The metrics.parquet of each key that has one (for overlaid training curves)."""
    logs = {}
    for key in keys:
        path = layout.pull(layout.sae_dir(key), METRICS_FILE) / METRICS_FILE
        if path.exists():
            logs[key] = pl.read_parquet(path)
    return logs


def finished_l0(layout: Layout, keys: list[str]) -> dict[str, float]:
    """Held-out l0_fraction of each finished key (summary.json present)."""
    result = {}
    for key in keys:
        summary = read_summary(layout, key)
        value = summary["metrics"].get("l0_fraction") if summary else None
        if value is not None:
            result[key] = float(value)
    return result
