"""Readers of what the trackers wrote, for the tracking tests and the CI run's check (`make test`):
`python -m sae_pipeline_tests.tracking_records <storage root> <mlflow uri> <experiment> <wandb dir>` exits 1 unless
every trained partition has an MLflow run whose histories equal its `metrics.parquet` and one offline W&B run."""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

import polars as pl

from sae_pipeline.results import METRICS_FILE
from sae_pipeline.storage import Layout
from sae_pipeline.training import METRIC_COLUMNS


def curve_columns() -> list[str]:
    """The columns of `metrics.parquet` a tracker logs as curves (the step is their x axis)."""
    return [c for c in METRIC_COLUMNS if c != "step"]


def wandb_history(run_dir: Path) -> list[dict[str, float]]:
    """The history rows of an offline W&B run, read from its `run-*.wandb` file: a LevelDB-style log (a 7-byte
    W&B header, then 32 KiB blocks of records, each a 7-byte header of checksum, length and type: full, first,
    middle, last) of `wandb_internal_pb2.Record` protobufs. wandb has no public reader of offline runs; on an
    upgrade that changes the format this fails loudly."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data, block, position, pending, records = path.read_bytes(), 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:  # zero padding up to the end of the block
            position += left
            continue
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            rows.append({key: float(value) for key, value in items.items()
                         if not key.startswith("_") or key == "_step"})
    return rows


def mlflow_histories(uri: str, experiment: str) -> tuple[dict[str, Any], dict[str, dict[str, list]]]:
    """The experiment's runs by name, and each run's (step, value) history of every curve."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}, {}
    runs = {run.info.run_name: run for run in client.search_runs([found.experiment_id])}
    return runs, {name: {column: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, column)]
                         for column in curve_columns()} for name, run in runs.items()}


def parquet_history(metrics: pl.DataFrame, column: str) -> list[tuple[int, float]]:
    return list(zip(metrics["step"], metrics[column], strict=True))


def check_ci_run(root: Path, uri: str, experiment: str, wandb_dir: Path) -> list[str]:
    """What is wrong with the tracking of the partitions trained under `root` (nothing: an empty list)."""
    layout = Layout(root)
    trained = layout.root / "sae"
    keys = sorted(p.name for p in trained.iterdir() if (p / METRICS_FILE).exists()) if trained.exists() else []
    runs, histories = mlflow_histories(uri, experiment)
    problems = [] if keys else [f"no trained partition under {root}"]
    for key in keys:
        metrics = pl.read_parquet(layout.sae_dir(key) / METRICS_FILE)
        if key not in runs:
            problems.append(f"{key}: no MLflow run in experiment {experiment!r}")
            continue
        problems += [f"{key}: MLflow {column} history differs from metrics.parquet" for column in ("fvu", "l0")
                     if histories[key][column] != parquet_history(metrics, column)]
    offline = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    if len(offline) != len(keys):
        problems.append(f"{len(offline)} offline W&B runs under {wandb_dir} for {len(keys)} partition(s)")
    return problems


if __name__ == "__main__":
    found = check_ci_run(Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    print("\n".join(found) or "tracking: every partition's MLflow fvu/l0 history equals its metrics.parquet, "
          "and each has an offline W&B run")
    sys.exit(1 if found else 0)
