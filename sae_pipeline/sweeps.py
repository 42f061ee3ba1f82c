"""Registered SAE configs: each partition key maps back to its full config, stored under the storage root."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from sae_pipeline.analysis import FAILED_CHECKS, HYPERPARAMETERS, METRICS, WALL_SECONDS, last_window_mean
from sae_pipeline.calibration import GroupPlan, calibratable, plan_groups
from sae_pipeline.config import (
    MAX_SPEC_BYTES,
    CalibrationSpec,
    ConfigError,
    SAEConfig,
    SweepSpec,
    load_sweep,
    parse_sae_config,
    validate_partition_key,
)
from sae_pipeline.consistency import SAE_DIR, SEED_GROUP, seed_group
from sae_pipeline.quality import VERDICT_FILE, blocking_failures
from sae_pipeline.saes.base import CFG_FILE, WEIGHTS_FILE
from sae_pipeline.storage import Layout

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.parquet"


def store_configs(layout: Layout, configs: list[SAEConfig]) -> list[str]:
    """Write `configs/<key>.json` for each config (idempotent); returns the keys in order."""
    keys = []
    for config in configs:
        key = config.partition_key()
        path = layout.configs_dir / f"{key}.json"
        payload = config.model_dump(mode="json")
        stored = layout.read_bytes(path)
        if stored is None:
            layout.write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
        elif json.loads(stored) != payload:
            raise ConfigError(f"partition key {key}: already registered with a different config "
                              f"({layout.location(layout.configs_dir, path.name)})")
        keys.append(key)
    return keys


def validate_configs_for_model(configs: Iterable[SAEConfig], d_model: int, where: str = "") -> None:
    """Check the width-dependent fields (k < d_sae, ...) of every config; ConfigError names the key."""
    for config in configs:
        try:
            config.validate_for_model(d_model)
        except ConfigError as error:
            raise ConfigError(f"{where}{config.partition_key()}: {error}") from None


def load_config(layout: Layout, key: str) -> SAEConfig:
    """The full config registered for a partition key."""
    name = f"{validate_partition_key(key)}.json"
    where = layout.location(layout.configs_dir, name)
    stored = layout.read_bytes(layout.configs_dir / name)
    if stored is None:
        raise ConfigError(f"partition key {key}: not registered (no {where}); a partition added by hand (the UI's "
                          "\"Add partition\") has no config: register the sweep file that defines it with "
                          "`sae-pipeline register-sweep <file>` (e.g. data/sweeps/default.yaml)")
    return parse_sae_config(json.loads(stored), where=where)


def registered_keys(layout: Layout) -> list[str]:
    return [name.removesuffix(".json") for name in layout.names(layout.configs_dir, ".json")]


def read_summary(layout: Layout, key: str) -> dict | None:
    """A finished partition's summary.json (held-out metrics and config), or None when it has none."""
    path = layout.pull(layout.sae_dir(key), SUMMARY_FILE) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else None


TRAIN_WINDOW_COLUMNS = {"train_l0_last_window": "l0", "train_dead_fraction_last_window": "dead_fraction"}
"""Columns added from each partition's metrics.parquet: the last-window mean (second half) of a training metric."""


def collect_runs(layout: Layout, keys: list[str], logs: dict[str, pl.DataFrame] | None = None
                 ) -> tuple[pl.DataFrame, list[str]]:
    """One row per finished partition; missing keys.

    A row holds the hyperparameters, the held-out metrics, `final_loss` (the last-window mean of the training
    loss, from summary.json), `wall_seconds` (its training wall time), the last-window means of the training L0
    and dead fraction from the partition's training log (`logs`, read with `training_logs` when not given; null
    when absent or empty), its failed blocking checks (`failed_checks`, from the verdicts; empty when it
    passed), its `seed` and SEED_GROUP, and, for configs finished with two or more seeds, SAE_DIR: the local
    folder of its saved weights (pulled only for those, for the cross-seed consistency section).
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
        window: dict[str, float | None] = dict.fromkeys(TRAIN_WINDOW_COLUMNS)
        log = logs.get(key)
        if log is not None and log.height:
            window = {name: last_window_mean(log, column) if column in log.columns else None
                      for name, column in TRAIN_WINDOW_COLUMNS.items()}
        rows.append({"key": key, **hyper, **metrics, "final_loss": summary["final_loss"], **window,
                     WALL_SECONDS: summary.get(WALL_SECONDS),
                     FAILED_CHECKS: failed_checks(layout, key), "seed": summary["config"].get("seed"),
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


def sweeps_dir(layout: Layout) -> Path:
    """Folder of sweep specs the sensors watch: `$SAE_PIPELINE_SWEEPS`, else `<storage root>/sweeps` (on
    object storage, a local copy of it refreshed on each call)."""
    if os.environ.get("SAE_PIPELINE_SWEEPS"):
        return Path(os.environ["SAE_PIPELINE_SWEEPS"])
    return layout.mirror(layout.root / "sweeps", ".yaml")


@dataclass(frozen=True)
class SweepFile:
    """A sweep spec found in the sweeps folder."""

    path: Path
    digest: str
    """sha256 of the file's bytes (the sensor's cursor compares these)."""
    spec: SweepSpec | None
    """The validated spec, or None when the file is not a valid sweep spec."""
    error: str | None
    configs: tuple[SAEConfig, ...] = ()


def read_sweep_file(path: Path) -> SweepFile:
    """One sweep file, validated; an invalid one carries its error instead of a spec."""
    path = Path(path)
    with open(path, "rb") as handle:  # bounded: load_sweep refuses anything larger
        digest = hashlib.sha256(handle.read(MAX_SPEC_BYTES + 1)).hexdigest()
    try:
        spec = load_sweep(path)
        return SweepFile(path, digest, spec, None, tuple(spec.expand()))
    except ConfigError as error:
        return SweepFile(path, digest, None, str(error))


def scan_sweeps(folder: Path) -> list[SweepFile]:
    """Every `*.yaml` in `folder`, sorted by name, validated (invalid ones carry their error)."""
    return [read_sweep_file(path) for path in (sorted(folder.glob("*.yaml")) if folder.exists() else [])]


def finished_l0(layout: Layout, keys: list[str]) -> dict[str, float]:
    """Held-out l0_fraction of each finished key (summary.json present)."""
    result = {}
    for key in keys:
        summary = read_summary(layout, key)
        value = summary["metrics"].get("l0_fraction") if summary else None
        if value is not None:
            result[key] = float(value)
    return result


def registered_configs(layout: Layout) -> dict[str, SAEConfig]:
    """Every registered key -> its full config."""
    return {key: load_config(layout, key) for key in registered_keys(layout)}


@dataclass(frozen=True)
class SweepCalibration:
    """The calibration plans of one sweep spec's relu configs with a target_l0."""

    sweep: SweepFile
    settings: CalibrationSpec
    """The spec's `calibration` section, or the defaults when it has none."""
    plans: list[GroupPlan]

    @property
    def enabled(self) -> bool:
        return self.sweep.spec is not None and self.sweep.spec.calibration is not None and self.settings.enabled


def calibration_state(layout: Layout, pending: Iterable[str] = (), sweeps: list[SweepFile] | None = None
                      ) -> list[SweepCalibration]:
    """Plans for every valid sweep spec (in the sweeps folder) that has a relu config with a target_l0.

    A spec's own keys are its seed runs; other registered keys of the same base config are proposed rounds.
    Only registered seed keys count (a spec not yet registered has nothing to calibrate). `sweeps`: the specs
    to look at (default: every file in the sweeps folder).
    """
    configs = registered_configs(layout)
    l0 = finished_l0(layout, list(configs))
    result = []
    for sweep in scan_sweeps(sweeps_dir(layout)) if sweeps is None else sweeps:
        seeds = [c.partition_key() for c in sweep.configs if calibratable(c) and c.partition_key() in configs]
        if sweep.spec is None or not seeds:
            continue
        settings = sweep.spec.calibration or CalibrationSpec()
        plans = plan_groups(configs, l0, seeds, pending, settings.tolerance, settings.max_rounds)
        result.append(SweepCalibration(sweep, settings, plans))
    return result
