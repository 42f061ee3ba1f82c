"""Registered SAE configs: each partition key maps back to its full config, stored under the storage root."""

from __future__ import annotations

import polars as pl

from sae_pipeline.analysis import HYPERPARAMETERS, METRICS
from sae_pipeline.config import ConfigError, SAEConfig, parse_sae_config, validate_partition_key
from sae_pipeline.storage import Layout, read_json, write_json_atomic


def store_configs(layout: Layout, configs: list[SAEConfig]) -> list[str]:
    """Write `configs/<key>.json` for each config (idempotent); returns the keys in order."""
    keys = []
    for config in configs:
        key = config.partition_key()
        path = layout.configs_dir / f"{key}.json"
        payload = config.model_dump(mode="json")
        if path.exists() and read_json(path) != payload:
            raise ConfigError(f"partition key {key}: already registered with a different config ({path})")
        if not path.exists():
            write_json_atomic(path, payload)
        keys.append(key)
    return keys


def load_config(layout: Layout, key: str) -> SAEConfig:
    """The full config registered for a partition key."""
    path = layout.configs_dir / f"{validate_partition_key(key)}.json"
    if not path.exists():
        raise ConfigError(f"partition key {key}: not registered (no {path}); run `sae-pipeline register-sweep`")
    return parse_sae_config(read_json(path), where=str(path))


def registered_keys(layout: Layout) -> list[str]:
    return sorted(p.stem for p in layout.configs_dir.glob("*.json"))


def collect_runs(layout: Layout, keys: list[str]) -> tuple[pl.DataFrame, list[str]]:
    """One row per finished partition (hyperparameters + held-out metrics + last-window loss); missing keys."""
    rows, missing = [], []
    for key in keys:
        path = layout.sae_dir(key) / "summary.json"
        if not path.exists():
            missing.append(key)
            continue
        summary = read_json(path)
        hyper = {name: summary["config"].get(name) for name in HYPERPARAMETERS}
        metrics = {name: summary["metrics"].get(name) for name in METRICS if name in summary["metrics"]}
        rows.append({"key": key, **hyper, **metrics, "final_loss": summary["final_loss"]})
    return pl.DataFrame(rows, infer_schema_length=None), missing
