"""GPU work runs in the concurrency pool `gpu`, limit 1, as a fresh instance from the shipped dagster.yaml gets it."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest

from sae_pipeline.definitions import defs

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
