"""Experiment tracking (W&B offline, MLflow on a local file store): one run per partition, a group's members each
in their own, whose metric histories equal `metrics.parquet`; a failing tracker warns and never fails training;
an API key in the environment is never written anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from sae_pipeline import tracking
from sae_pipeline.config import ConfigError
from sae_pipeline.defs.assets import sae
from sae_pipeline.defs.partitions import sae_configs
from sae_pipeline.defs.resources import TrackingResource
from sae_pipeline.quality import VERDICT_FILE
from sae_pipeline.registry import store_configs, sweep_of
from sae_pipeline.results import METRICS_FILE, SUMMARY_FILE
from sae_pipeline.storage import read_json
from sae_pipeline_tests.conftest import ALL_ASSETS, Pipeline, tiny_topk
from sae_pipeline_tests.tracking_records import curve_columns, mlflow_histories, wandb_history

SWEEP = "tracked_sweep"
SECRET = "sentinel-api-key-0f3c9d"


def _canonical(history: list[dict]) -> str:
    """A history as text independent of each row's key order (W&B's rows come in any order)."""
    return json.dumps(history, sort_keys=True)


# ---------------------------------------------------------------- the trackers setting

@pytest.mark.parametrize(("spec", "parsed"), [("", ()), ("wandb", ("wandb",)),
                                              (" mlflow , wandb ", ("mlflow", "wandb")), ("wandb,wandb", ("wandb",))])
def test_trackers_parse(spec: str, parsed: tuple[str, ...]) -> None:
    assert tracking.parse_trackers(spec) == parsed


def test_an_unknown_or_missing_tracker_is_refused_with_the_field_and_what_to_do(monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"^trackers: unknown tracker 'tensorboard'; allowed: wandb, mlflow"):
        tracking.parse_trackers("wandb,tensorboard", "trackers")
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(ConfigError, match=r"tracker 'mlflow' asked for, but mlflow is not installed: pip install"):
        tracking.parse_trackers("mlflow")


class _Broken:
    """A tracker run whose every call fails, as one with no network or a bad key does."""

    logged = 0

    def __init__(self, *_args):
        pass

    def log(self, row: dict) -> None:
        _Broken.logged += 1
        raise ConnectionError("no route to api.wandb.ai")

    def end(self, end: tracking.RunEnd) -> None:
        raise AssertionError("a dropped tracker is not called again")


def test_a_failing_tracker_warns_once_and_is_dropped(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tracking, "_WandbRun", _Broken)
    _Broken.logged = 0
    warnings: list[str] = []
    session = tracking.Tracking(["wandb"], warnings.append, tmp_path)
    runs = [session.start(tracking.RunInfo(f"k{i}", "g", {})) for i in range(2)]
    for row in ({"step": 1, "l0": 3.0}, {"step": 2, "l0": 2.0}):
        for run in runs:
            run.log(row)
    session.close()
    assert _Broken.logged == 1
    assert len(warnings) == 1 and "wandb failed (ConnectionError: no route to api.wandb.ai)" in warnings[0]
    assert "training goes on" in warnings[0]


def test_a_tracker_that_cannot_start_leaves_the_others(monkeypatch, tmp_path: Path) -> None:
    class Recorder:
        def __init__(self, *_args):
            self.rows, self.ends = [], []

        def log(self, row):
            self.rows.append(row)

        def end(self, end):
            self.ends.append(end.status)

    def refuse(*_args):
        raise PermissionError("api key rejected")

    monkeypatch.setattr(tracking, "_WandbRun", refuse)
    monkeypatch.setattr(tracking, "_MlflowRun", Recorder)
    warnings: list[str] = []
    session = tracking.Tracking(["wandb", "mlflow"], warnings.append, tmp_path)
    run = session.start(tracking.RunInfo("k", "g", {}))
    run.log({"step": 5, "fvu": 0.5})
    session.close()  # a run nobody ended ends as killed
    (recorder,) = run.runs.values()
    assert recorder.rows == [{"step": 5, "fvu": 0.5}] and recorder.ends == ["killed"]
    assert [w.split(" (")[0] for w in warnings] == ["tracking: wandb failed"]


# ---------------------------------------------------------------- a grouped run, tracked by both

@pytest.fixture(scope="module")
def tracked(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two configs registered by one sweep, trained as one group in one ranged `sae` run with both trackers on
    (W&B offline, MLflow on a file store) and an API key in the environment."""
    folder = tmp_path_factory.mktemp("tracking")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(folder), "WANDB_API_KEY": SECRET, "WANDB_SILENT": "true",
           "MLFLOW_TRACKING_URI": (folder / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    configs = [tiny_topk(k=k, lr=1.7e-3, train_tokens=256 * 24, log_every=5) for k in (4, 6)]
    keys = store_configs(pipeline.layout, configs, SWEEP)
    pipeline.instance.add_dynamic_partitions(sae_configs.name, keys)
    resources = {**pipeline.resources(), "tracking": TrackingResource(trackers="wandb,mlflow")}
    one_range = {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        result = dg.materialize(ALL_ASSETS, selection=[sae], instance=pipeline.instance, resources=resources,
                                tags=one_range, raise_on_error=False)
        assert result.success
        runs, histories = mlflow_histories(env["MLFLOW_TRACKING_URI"], SWEEP)
    messages = [entry.user_message for entry in pipeline.instance.all_logs(result.run_id)]
    return {"keys": keys, "folder": folder, "runs": runs, "histories": histories, "messages": messages}


def test_each_partition_of_a_group_gets_its_own_mlflow_run_in_the_sweeps_experiment(pipeline: Pipeline,
                                                                                   tracked: dict) -> None:
    assert sweep_of(pipeline.layout, tracked["keys"][0]) == SWEEP
    assert sorted(tracked["runs"]) == sorted(tracked["keys"])
    for key in tracked["keys"]:
        run = tracked["runs"][key]
        summary = read_json(pipeline.layout.sae_dir(key) / SUMMARY_FILE)
        assert run.info.status == "FINISHED"
        assert run.data.params["k"] == str(summary["config"]["k"]) and run.data.params["partition_key"] == key
        assert run.data.metrics["eval/fvu"] == summary["metrics"]["fvu"]
        assert run.data.metrics["eval/l0"] == summary["metrics"]["l0"]
        verdict = read_json(pipeline.layout.sae_dir(key) / VERDICT_FILE)
        assert {name: run.data.tags[f"check/{name}"] for name in verdict["checks"]} == {
            name: "pass" if check["passed"] else check["severity"] for name, check in verdict["checks"].items()}
        assert run.data.tags["weights_dir"] == pipeline.layout.location(pipeline.layout.sae_dir(key))


def test_mlflow_histories_equal_metrics_parquet(pipeline: Pipeline, tracked: dict) -> None:
    for key in tracked["keys"]:
        metrics = pl.read_parquet(pipeline.layout.sae_dir(key) / METRICS_FILE)
        assert metrics.height >= 4
        for column in curve_columns():
            assert tracked["histories"][key][column] == list(zip(metrics["step"], metrics[column], strict=True)), column


def test_each_partition_leaves_an_offline_wandb_run_whose_history_equals_metrics_parquet(pipeline: Pipeline,
                                                                                       tracked: dict) -> None:
    run_dirs = sorted((tracked["folder"] / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == len(tracked["keys"])
    histories = [wandb_history(run_dir) for run_dir in run_dirs]
    expected = []
    for key in tracked["keys"]:
        metrics = pl.read_parquet(pipeline.layout.sae_dir(key) / METRICS_FILE)
        expected.append([{"_step": float(row["step"]), **{c: float(row[c]) for c in curve_columns()}}
                         for row in metrics.to_dicts()])
    assert sorted(histories, key=_canonical) == sorted(expected, key=_canonical)


def test_the_api_key_is_written_nowhere_and_nothing_alarms(pipeline: Pipeline, tracked: dict) -> None:
    for root in (tracked["folder"], pipeline.root):
        for path in root.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path
    assert not [m for m in tracked["messages"] if SECRET in m]
    assert not [m for m in tracked["messages"] if "tracking:" in m]  # no tracker failed
