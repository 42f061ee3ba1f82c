"""GPU work runs in the concurrency pool `gpu`, limit 1, as a fresh instance from the shipped dagster.yaml gets it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from sae_pipeline.definitions import defs
from sae_pipeline.defs.runs import PID_TAG, process_tags, release_dead_runs

SHIPPED_INSTANCE_CONFIG = Path(__file__).resolve().parents[1] / "data" / "dagster_home" / "dagster.yaml"


@pytest.fixture
def fresh_instance(tmp_path: Path):
    shutil.copy(SHIPPED_INSTANCE_CONFIG, tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        yield instance


def test_new_instance_limits_pool_gpu_to_one(fresh_instance: dg.DagsterInstance) -> None:
    assert fresh_instance.get_concurrency_config().pool_config.default_pool_limit == 1
    info = fresh_instance.event_log_storage.get_concurrency_info("gpu")
    assert info.limit == 1
    # a second step asking for the pool while the first holds it waits (slots are created from the default
    # limit when a step first asks for the pool, as the step executor does)
    storage = fresh_instance.event_log_storage
    storage.initialize_concurrency_limit_to_default("gpu")
    assert storage.get_concurrency_info("gpu").slot_count == 1
    first = fresh_instance.event_log_storage.claim_concurrency_slot("gpu", "run-a", "sae")
    second = fresh_instance.event_log_storage.claim_concurrency_slot("gpu", "run-b", "sae")
    assert first.is_claimed and not second.is_claimed
    fresh_instance.event_log_storage.free_concurrency_slots_for_run("run-a")
    assert fresh_instance.event_log_storage.claim_concurrency_slot("gpu", "run-b", "sae").is_claimed


def test_gpu_assets_declare_the_pool_and_cpu_assets_do_not() -> None:
    pools = {key.to_user_string(): defs.get_assets_def(key).node_def.pool
             for key in (dg.AssetKey(n) for n in ("corpus", "activations", "sae", "features", "feature_labels",
                                                  "sweep_analysis", "calibration"))}
    assert pools["sae"] == "gpu" and pools["features"] == "gpu"
    assert {name for name, pool in pools.items() if pool == "gpu"} == {"sae", "features"}


def test_shipped_instance_monitors_runs_and_frees_slots_of_ended_runs(fresh_instance: dg.DagsterInstance) -> None:
    assert fresh_instance.run_monitoring_enabled
    assert fresh_instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0


def test_runs_of_dead_processes_are_failed_and_their_slots_freed(fresh_instance: dg.DagsterInstance) -> None:
    from dagster._core.storage.dagster_run import DagsterRun

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    storage = fresh_instance.event_log_storage
    storage.initialize_concurrency_limit_to_default("gpu")
    runs = {}
    for name, pid in (("dead", gone.pid), ("alive", os.getpid())):
        run = DagsterRun(job_name="train_sweep", run_id=f"run-{name}", status=dg.DagsterRunStatus.STARTED,
                         tags={**process_tags(), PID_TAG: str(pid)})
        runs[name] = fresh_instance.add_run(run)
    assert storage.claim_concurrency_slot("gpu", "run-dead", "sae").is_claimed
    assert not storage.claim_concurrency_slot("gpu", "run-next", "sae").is_claimed  # blocked by the dead run

    assert release_dead_runs(fresh_instance) == ["run-dead"]
    assert fresh_instance.get_run_by_id("run-dead").status == dg.DagsterRunStatus.FAILURE
    assert fresh_instance.get_run_by_id("run-alive").status == dg.DagsterRunStatus.STARTED
    assert storage.claim_concurrency_slot("gpu", "run-next", "sae").is_claimed
    assert release_dead_runs(fresh_instance) == []
