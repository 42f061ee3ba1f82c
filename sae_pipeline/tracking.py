"""Experiment tracking, optional and off by default: each trained partition logged to Weights & Biases and/or
MLflow, where researchers compare runs across projects (as SAELens, sparsify and dictionary_learning log theirs).

One tracking run per partition, a group's members each in their own, grouped by sweep (W&B's `group`, an MLflow
experiment named after the sweep). A run gets the config, every training row as it is logged (the columns of
`metrics.parquet`, at the training step; a resumed run gets its checkpoint's rows first), then the held-out
metrics (`eval/<name>`), each check's verdict (`check/<name>`) and the weights' folder.

A tracker that fails (no network, a bad key) warns once and is dropped for the rest of the run: tracking never
fails training. Keys, endpoints and modes are read by the libraries themselves from their own environment
(WANDB_API_KEY, WANDB_MODE, WANDB_DIR, WANDB_PROJECT, MLFLOW_TRACKING_URI, ...); nothing here reads a key or
writes one anywhere. Unset, WANDB_DIR and MLFLOW_TRACKING_URI default to `<storage root>/tracking/` (W&B's run
folders, an MLflow SQLite database)."""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from sae_pipeline.config import ConfigError

TRACKERS = ("wandb", "mlflow")
TRACKING_ENV = "SAE_PIPELINE_TRACKING"
DEFAULT_GROUP = "sae_pipeline"
"""The W&B project unless WANDB_PROJECT names one, and the group / experiment of a key that no sweep registered."""
INSTALL_HINT = "pip install -c constraints.txt -e '.[tracking]'"
MLFLOW_PARAMS_PER_BATCH = 100
"""MLflow's limit on params in one `log_batch` call."""

Status = Literal["finished", "failed", "killed"]


def parse_trackers(spec: str, field_name: str = TRACKING_ENV) -> tuple[str, ...]:
    """`""` (off), `wandb`, `mlflow` or `wandb,mlflow`, each tracker's library installed; ConfigError names
    `field_name`, the allowed values, and the install command for a missing library."""
    names = list(dict.fromkeys(name.strip() for name in spec.split(",") if name.strip()))
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"{field_name}: unknown tracker {name!r}; allowed: {', '.join(TRACKERS)}, or both "
                              f"comma-separated (wandb,mlflow), or empty for none")
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"{field_name}: tracker {name!r} asked for, but {name} is not installed: "
                              f"{INSTALL_HINT}")
    return tuple(names)


@dataclass(frozen=True)
class RunInfo:
    """What opens one partition's tracking run."""

    key: str
    group: str
    config: dict[str, Any]


@dataclass(frozen=True)
class RunEnd:
    """How a partition's tracking run ends: its status, then (when published) its held-out metrics, check
    verdicts (`pass`, `WARN` or `ERROR`) and weights folder."""

    status: Status
    metrics: dict[str, float] = field(default_factory=dict)
    verdicts: dict[str, str] = field(default_factory=dict)
    weights_dir: str | None = None


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The int/float entries of `values` as floats (no bools, strings or None): what a tracker takes as metrics."""
    return {name: float(value) for name, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool)}


def _curves(row: dict[str, Any]) -> dict[str, float]:
    """A training row's metrics, the step aside (it is the x axis)."""
    return {name: value for name, value in numeric(row).items() if name != "step"}


class _Run(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def end(self, end: RunEnd) -> None: ...


class _WandbRun:
    """One W&B run, made beside the others of the process (`reinit="create_new"`); WANDB_MODE=offline writes
    it to `<dir>/wandb/offline-run-*` for `wandb sync`."""

    def __init__(self, info: RunInfo, default_dir: Path):
        import wandb

        directory = None
        if not os.environ.get("WANDB_DIR"):
            default_dir.mkdir(parents=True, exist_ok=True)
            directory = str(default_dir)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or DEFAULT_GROUP, group=info.group,
                              name=info.key, job_type="train_sae", config=info.config, dir=directory,
                              reinit="create_new", settings=wandb.Settings(console="off", quiet=True))

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(_curves(row), step=int(row["step"]))

    def end(self, end: RunEnd) -> None:
        self.run.summary.update({**{f"eval/{k}": v for k, v in end.metrics.items()},
                                 **{f"check/{k}": v for k, v in end.verdicts.items()}})
        if end.weights_dir is not None:
            self.run.config.update({"weights_dir": end.weights_dir}, allow_val_change=True)
        self.run.finish(exit_code=0 if end.status == "finished" else 1)


class _MlflowRun:
    """One MLflow run through the client API (several can be open in one process), in the experiment named
    after the sweep."""

    STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}

    def __init__(self, info: RunInfo, default_dir: Path):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            default_dir.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{default_dir / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = self.client.create_run(self._experiment(info.group), run_name=info.key,
                                             tags={"sae_pipeline.partition": info.key}).info.run_id
        params = [Param(name, str(value)) for name, value in sorted(info.config.items())]
        for start in range(0, len(params), MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + MLFLOW_PARAMS_PER_BATCH])

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # made meanwhile by another process
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        stamp, step = int(time.time() * 1000), int(row["step"])
        self.client.log_batch(self.run_id, metrics=[Metric(name, value, stamp, step)
                                                    for name, value in _curves(row).items()])

    def end(self, end: RunEnd) -> None:
        from mlflow.entities import Metric, RunTag

        stamp = int(time.time() * 1000)
        tags = [RunTag(f"check/{name}", verdict) for name, verdict in end.verdicts.items()]
        if end.weights_dir is not None:
            tags.append(RunTag("weights_dir", end.weights_dir))
        self.client.log_batch(self.run_id, metrics=[Metric(f"eval/{k}", v, stamp, 0) for k, v in end.metrics.items()],
                              tags=tags)
        self.client.set_terminated(self.run_id, self.STATUS[end.status])


class Tracking:
    """The trackers of one Dagster run or command: opens a partition's tracking runs (`start`) and drops a
    tracker, with one warning, the first time it fails."""

    def __init__(self, trackers: Sequence[str], warn: Callable[[str], None], folder: Path):
        self.trackers, self.warn, self.folder = tuple(trackers), warn, folder
        self.dropped: set[str] = set()
        self.open: list[PartitionTracking] = []

    @property
    def enabled(self) -> bool:
        return bool(self.trackers)

    def guard(self, tracker: str, action: Callable[[], Any]) -> Any:
        """`action()`, or None with a warning (once) and the tracker dropped if it raises."""
        if tracker in self.dropped:
            return None
        try:
            return action()
        except Exception as error:  # tracking never fails training
            self.dropped.add(tracker)
            self.warn(f"tracking: {tracker} failed ({type(error).__name__}: {error}); training goes on, "
                      f"without {tracker} for the rest of this run")
            return None

    def _open(self, tracker: str, info: RunInfo) -> _Run:
        if tracker == "wandb":
            return _WandbRun(info, self.folder)
        return _MlflowRun(info, self.folder)

    def start(self, info: RunInfo) -> PartitionTracking:
        """A partition's tracking run in each live tracker (none when tracking is off)."""
        runs = {name: run for name in self.trackers
                if (run := self.guard(name, lambda name=name: self._open(name, info))) is not None}
        partition = PartitionTracking(self, runs)
        self.open.append(partition)
        return partition

    def close(self) -> None:
        """End every run still open as killed (the command stopped or failed before it ended them)."""
        for partition in self.open:
            partition.end(RunEnd("killed"))
        self.open.clear()


class PartitionTracking:
    """One partition's runs, one per live tracker: `log` each training row, then `end` once."""

    def __init__(self, session: Tracking, runs: dict[str, _Run]):
        self.session, self.runs = session, runs
        self.ended = False

    def log(self, row: dict[str, Any]) -> None:
        for name, run in self.runs.items():
            self.session.guard(name, lambda run=run: run.log(row))

    def end(self, end: RunEnd) -> None:
        if self.ended:
            return
        self.ended = True
        for name, run in self.runs.items():
            self.session.guard(name, lambda run=run: run.end(end))
