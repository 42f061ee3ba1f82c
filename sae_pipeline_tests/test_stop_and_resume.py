"""`sae-pipeline run-sweep` as a user drives it: Ctrl-C (or SIGTERM to the process group) in any step stops it
within seconds, with the run cancelled and one line saying which step stopped, what it kept (training's
checkpoint, the labels obtained) and how to resume; after SIGKILL a rerun releases the dead run, resumes from the
checkpoint and reaches the uninterrupted result. Real subprocesses, bounded waits."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import torch
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from sae_pipeline.config import SAEConfig
from sae_pipeline.defs.assets import sae
from sae_pipeline.defs.runs import STOPPED_TAG
from sae_pipeline.results import SUMMARY_FILE
from sae_pipeline.storage import Layout
from sae_pipeline.sweep_spec import load_sweep
from sae_pipeline.training import CHECKPOINT_FILE
from sae_pipeline_tests.conftest import ALL_ASSETS, Pipeline

REPO = Path(__file__).resolve().parents[1]
SWEEP = """name: stop_test
base: {{architecture: topk, expansion_factor: 2, k: 8, lr: 0.001, batch_size: 256, train_tokens: {tokens},
       log_every: 5, checkpoint_every: 5, dead_tokens: 5120}}
grid: {grid}
"""


@pytest.fixture(autouse=True)
def _no_leaked_defs_state_storage():
    """Some earlier tests leave Dagster's current defs-state storage pointing at a deleted temporary instance;
    in-process runs here (which build Definitions) must not read it."""
    from dagster._core.storage.defs_state.base import set_defs_state_storage

    with set_defs_state_storage(None):
        yield


def _home(pipeline: Pipeline, tmp_path: Path, tokens: int, seeds: list[int], ks: list[int] | None = None
          ) -> tuple[dict, Path, list[str]]:
    """A storage root holding the session's corpus + activations, an instance with the shipped dagster.yaml
    (gpu pool limit 1), and a sweep spec; returns the environment, the spec and its keys."""
    root, home = tmp_path / "root", tmp_path / "home"
    for folder in ("corpus", "activations"):
        shutil.copytree(pipeline.root / folder, root / folder)
    home.mkdir()
    shutil.copy(REPO / "data/dagster_home/dagster.yaml", home / "dagster.yaml")
    spec = tmp_path / "stop_test.yaml"
    grid = f"{{seed: {seeds}, k: {ks}}}" if ks else f"{{seed: {seeds}}}"
    spec.write_text(SWEEP.format(tokens=tokens, grid=grid))
    keys = [config.partition_key() for config in load_sweep(spec).expand()]
    env = {**os.environ, "SAE_PIPELINE_ROOT": str(root), "DAGSTER_HOME": str(home), "SAE_PIPELINE_DEVICE": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return env, spec, keys


def _start(env: dict, spec: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sae_pipeline.cli", "run-sweep", str(spec)], env=env,
                            cwd=spec.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"{path} never appeared:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.1)


def _stop(process: subprocess.Popen, group: bool, timeout: float) -> tuple[str, float]:
    """SIGINT to the process (Ctrl-C), or SIGTERM to its process group; its output and the seconds it took to
    exit (killed after `timeout`)."""
    sent = time.monotonic()
    if group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGINT)
    try:
        output = process.communicate(timeout=timeout)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return output, time.monotonic() - sent


def _runs(env: dict, job: str) -> list[dg.DagsterRun]:
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        return list(instance.get_runs(filters=dg.RunsFilter(job_name=job)))


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM to the process group"])
def test_stop_signal_cancels_the_run_keeps_the_checkpoint_and_starts_nothing_else(
        pipeline: Pipeline, tmp_path: Path, how: str) -> None:
    env, spec, keys = _home(pipeline, tmp_path, tokens=256 * 100_000, seeds=[0, 1])
    checkpoint = Path(env["SAE_PIPELINE_ROOT"]) / "checkpoints" / keys[0] / CHECKPOINT_FILE
    process = _start(env, spec)
    _wait_for(checkpoint, process)  # training is under way
    output, seconds = _stop(process, group=how != "SIGINT", timeout=30)
    assert seconds < 10, output[-3000:]
    signum = signal.SIGINT if how == "SIGINT" else signal.SIGTERM
    assert process.returncode == 128 + signum, output[-3000:]
    (run,) = _runs(env, "train_sweep")  # nothing later started
    assert run.status == dg.DagsterRunStatus.CANCELED and run.tags[STOPPED_TAG] == signum.name
    assert (run.tags[ASSET_PARTITION_RANGE_START_TAG], run.tags[ASSET_PARTITION_RANGE_END_TAG]) == tuple(keys)
    assert not _runs(env, "analyze_sweep")
    assert checkpoint.exists()
    steps = {key: _saved_step(Path(env["SAE_PIPELINE_ROOT"]) / "checkpoints" / key / CHECKPOINT_FILE) for key in keys}
    assert steps[keys[0]] > 0
    kept = "kept: " + "; ".join(f"{key} checkpoint at step {step}" if step else f"{key} no checkpoint yet (it restarts)"
                                for key, step in steps.items())
    # the terminal says in one line which step stopped, where a rerun starts and how to resume...
    _assert_one_stop_line(output, f"stopped by {signum.name} during sae (partitions {', '.join(keys)}); {kept}; "
                                  f"run `sae-pipeline run-sweep {spec}` to resume")
    assert _cancel_message(env, run) == f"Stopped by the user ({signum.name}) during sae (partitions " \
                                        f"{', '.join(keys)}); {kept}"  # ...and so does the run in the UI


def _assert_one_stop_line(output: str, line: str) -> None:
    """The stop is told in exactly `line`: no traceback, no other error line."""
    assert "Traceback" not in output and "Stack Trace" not in output, output[-3000:]
    assert [text for text in output.splitlines() if "stopped by SIG" in text] == [line], output[-3000:]
    assert " - ERROR - " not in output, output[-3000:]


def _cancel_message(env: dict, run: dg.DagsterRun) -> str:
    """The message of the run's PIPELINE_CANCELED event (what the UI shows)."""
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        (cancelled,) = [entry for entry in instance.all_logs(run.run_id)
                        if entry.dagster_event and entry.dagster_event.event_type_value == "PIPELINE_CANCELED"]
        return cancelled.dagster_event.message


HELD = """
import importlib, pathlib, sys, time
target, call, marker, *argv = sys.argv[1:]
path, name = target.split(":")
owner = importlib.import_module(path)
for part in name.split(".")[:-1]:
    owner = getattr(owner, part)
original, calls = getattr(owner, name.split(".")[-1]), []

def held(*args, **kwargs):  # the first call(s) as usual; call number `call` marks the file and waits
    calls.append(1)
    if len(calls) < int(call):
        return original(*args, **kwargs)
    pathlib.Path(marker).touch()
    time.sleep(120)

setattr(owner, name.split(".")[-1], held)
from sae_pipeline.cli import main
sys.exit(main(argv))
"""
"""`sae-pipeline <argv>` with one function held (at its `call`-th call) until a signal arrives: the stop lands
in a chosen step whatever the machine's speed, and everything else runs as shipped."""

STEP_STOPS = {  # step: (function held, at which call, what the stop line says was kept)
    "activations": ("sae_pipeline.defs.assets.data:extract_activations", 1,
                    "kept: 0 shard(s) of the extraction committed in {extraction} (the rerun resumes after them; the "
                    "activation store is published only when complete, and a previous one is unchanged)"),
    "features": ("sae_pipeline.defs.assets.interpretation:extract_features", 1,
                 "kept: what the earlier steps made (the features table is written only when complete: nothing "
                 "partial, and a previous one is unchanged)"),
    "feature_labels": ("sae_pipeline.labelling:OfflineLabeller.label", 3, "kept: 2 label(s) of {key} obtained so far"),
    "sweep_analysis": ("sae_pipeline.defs.assets.reports:build_sweep_report", 1,
                       "kept: what the earlier steps made (the sweep report is written only when complete: nothing "
                       "partial, and a previous one is unchanged)"),
}


@pytest.mark.parametrize("step", list(STEP_STOPS))
def test_ctrl_c_in_each_step_prints_one_line_keeps_what_it_made_and_cancels_the_run(
        pipeline: Pipeline, tmp_path: Path, step: str) -> None:
    env, spec, (key,) = _home(pipeline, tmp_path, tokens=256 * 20, seeds=[0])
    if step == "activations":
        shutil.rmtree(Path(env["SAE_PIPELINE_ROOT"]) / "activations")  # run-sweep extracts first
    target, call, kept = STEP_STOPS[step]
    marker = tmp_path / "held"
    process = subprocess.Popen([sys.executable, "-c", HELD, target, str(call), str(marker), "run-sweep", str(spec)],
                               env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    _wait_for(marker, process, timeout=240)
    output, seconds = _stop(process, group=False, timeout=60)
    assert seconds < 20, output[-3000:]
    assert process.returncode == 128 + signal.SIGINT, output[-3000:]
    partition = "" if step in ("activations", "sweep_analysis") else f" (partition {key})"
    kept = kept.format(key=key, extraction=Path(env["SAE_PIPELINE_ROOT"]) / "extraction")
    _assert_one_stop_line(output, f"stopped by SIGINT during {step}{partition}; {kept}; "
                                  f"run `sae-pipeline run-sweep {spec}` to resume")
    job = {"activations": "prepare_activations", "sweep_analysis": "analyze_sweep"}.get(step, "train_sweep")
    run = _runs(env, job)[0]  # the newest
    assert run.status == dg.DagsterRunStatus.CANCELED and run.tags[STOPPED_TAG] == "SIGINT"
    assert _cancel_message(env, run) == f"Stopped by the user (SIGINT) during {step}{partition}; {kept}"
    if step == "feature_labels":  # the two labels obtained wait for the rerun in the progress file
        progress = Layout(Path(env["SAE_PIPELINE_ROOT"])).labels_progress_dir(key) / "progress.json"
        assert len(json.loads(progress.read_text())["labels"]) == 2


def _saved_step(path: Path) -> int:
    """The step a checkpoint file holds (0 when there is none), read here rather than through the code under
    test."""
    return int(torch.load(path, weights_only=True)["step"]) if path.exists() else 0


def test_rerun_after_sigkill_releases_the_dead_run_resumes_and_matches_an_uninterrupted_run(
        pipeline: Pipeline, tmp_path: Path) -> None:
    env, spec, (key,) = _home(pipeline, tmp_path / "killed", tokens=256 * 300, seeds=[0])
    reference = Pipeline(tmp_path / "reference", dg.DagsterInstance.ephemeral())
    for folder in ("corpus", "activations"):
        shutil.copytree(pipeline.root / folder, reference.root / folder)
    assert reference.register(load_sweep(spec).expand()[0]) == key
    assert reference.materialize([sae], partition_key=key).success
    root = Path(env["SAE_PIPELINE_ROOT"])
    process = _start(env, spec)
    _wait_for(root / "checkpoints" / key / CHECKPOINT_FILE, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    (dead,) = _runs(env, "train_sweep")
    assert dead.status == dg.DagsterRunStatus.STARTED  # what a kill leaves behind

    rerun = subprocess.run([sys.executable, "-m", "sae_pipeline.cli", "run-sweep", str(spec)], env=env,
                           cwd=spec.parent, capture_output=True, text=True, timeout=150)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert f"run {dead.run_id}: its process is gone" in rerun.stdout
    statuses = {run.run_id: run.status for run in _runs(env, "train_sweep")}
    assert statuses.pop(dead.run_id) == dg.DagsterRunStatus.FAILURE
    assert list(statuses.values()) == [dg.DagsterRunStatus.SUCCESS] * 3  # sae, features, feature_labels
    resumed = json.loads((Layout(root).sae_dir(key) / SUMMARY_FILE).read_text())
    expected = json.loads((reference.layout.sae_dir(key) / SUMMARY_FILE).read_text())
    assert resumed["resumed_from_step"] > 0
    for name in ("fvu", "l0", "mse", "dead_fraction", "explained_variance", "cosine"):
        assert resumed["metrics"][name] == pytest.approx(expected["metrics"][name], abs=1e-4), name
    assert resumed["final_loss"] == pytest.approx(expected["final_loss"], abs=1e-4)


def _run_sweep(env: dict, spec: Path, *flags: str) -> str:
    done = subprocess.run([sys.executable, "-m", "sae_pipeline.cli", "run-sweep", *flags, str(spec)], env=env,
                          cwd=spec.parent, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


def test_configs_train_in_one_ranged_run_and_a_rerun_skips_current_partitions(pipeline: Pipeline,
                                                                                tmp_path: Path) -> None:
    env, spec, keys = _home(pipeline, tmp_path, tokens=256 * 10, seeds=[0], ks=[4, 8])
    output = _run_sweep(env, spec)
    assert "2 config(s) in one run" in output
    runs = list(reversed(_runs(env, "train_sweep")))  # oldest first: sae, features, feature_labels
    assert [sorted(key.to_user_string() for key in run.asset_selection) for run in runs] == [
        ["sae"], ["features"], ["feature_labels"]]
    for run in runs:  # each a ranged run over both configs
        assert (run.tags[ASSET_PARTITION_RANGE_START_TAG], run.tags[ASSET_PARTITION_RANGE_END_TAG]) == tuple(keys)
    sae_run = runs[0]
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        logs = [entry.user_message for entry in instance.all_logs(sae_run.run_id)]
        assert any("group 1/1: 2 configs in one pass" in message for message in logs)
        assert instance.get_materialized_partitions(dg.AssetKey("feature_labels")) == set(keys)
    rerun = _run_sweep(env, spec)
    assert all(f"{key}: skipped, current" in rerun for key in keys)
    assert len(_runs(env, "train_sweep")) == 3  # nothing retrained
    refreshed = _run_sweep(env, spec, "--refresh")
    assert "2 config(s) in one run" in refreshed and "== train_sweep feature_labels [1/1]: 2 config(s)" in refreshed
    assert len(_runs(env, "train_sweep")) == 6


@pytest.mark.parametrize("ranged", [False, True])
def test_a_terminated_sae_step_says_where_a_rerun_resumes(pipeline: Pipeline, tmp_path: Path, ranged: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A run terminated from the UI reaches the step as DagsterExecutionInterruptedError: the step's failure
    names each partition's resume step (a checkpoint's, or the start) and is not retried."""
    import sae_pipeline.defs.assets.training as training_assets

    copy = Pipeline(tmp_path / "root", dg.DagsterInstance.ephemeral())
    for folder in ("corpus", "activations"):
        shutil.copytree(pipeline.root / folder, copy.root / folder)
    keys = [copy.register(SAEConfig(architecture="topk", expansion_factor=2, k=8, batch_size=256, train_tokens=2560,
                                    seed=seed)) for seed in (0, 1)]
    saved = copy.layout.checkpoint_dir(keys[0]) / CHECKPOINT_FILE
    saved.parent.mkdir(parents=True)
    torch.save({"step": 7}, saved)

    def terminated(*_args, **_kwargs):
        raise dg.DagsterExecutionInterruptedError("terminated from the UI")

    monkeypatch.setattr(training_assets, "train_group", terminated)
    if ranged:
        result = dg.materialize(ALL_ASSETS, selection=[sae], instance=copy.instance, resources=copy.resources(),
                                tags={ASSET_PARTITION_RANGE_START_TAG: keys[0],
                                      ASSET_PARTITION_RANGE_END_TAG: keys[1]}, raise_on_error=False)
        expected = f"kept: {keys[0]} checkpoint at step 7; {keys[1]} no checkpoint yet (it restarts)"
    else:
        result = copy.materialize([sae], partition_key=keys[0])
        expected = f"kept: {keys[0]} checkpoint at step 7"
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "was stopped (interrupt or termination); not retried" in message and expected in message, message


def test_the_database_pool_is_quiet_about_a_connection_close_the_stop_interrupted(
        caplog: pytest.LogCaptureFixture) -> None:
    """sqlalchemy logs an interrupted close with the stop's traceback; once a stop arrived it is dropped, before
    it, it is shown as always."""
    import logging

    from sae_pipeline.defs.runs import POOL_LOGGER, quiet_while

    stopped = [False]
    logger = logging.getLogger(POOL_LOGGER)
    with caplog.at_level(logging.ERROR), quiet_while(POOL_LOGGER, lambda: stopped[0]):
        logger.error("Exception closing connection (before the stop)")
        stopped[0] = True
        logger.error("Exception closing connection (the stop)", exc_info=KeyboardInterrupt())
    logger.error("Exception closing connection (after the block)")
    assert [m.split(" (")[1] for m in caplog.messages] == ["before the stop)", "after the block)"]
