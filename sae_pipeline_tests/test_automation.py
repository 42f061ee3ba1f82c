"""Declarative automation: off unless SAE_PIPELINE_AUTOMATION=eager; with it, a newly registered partition is
requested down the sweep (sae, features, feature_labels) once, and a recomputed upstream asset requests what
depends on it."""

from __future__ import annotations

import dagster as dg
import pytest

from sae_pipeline.config import ConfigError
from sae_pipeline.defs.assets import (
    ENV_AUTOMATION,
    activations,
    automation_condition,
    calibration,
    corpus,
    feature_labels,
    features,
    sae,
    sweep_analysis,
)
from sae_pipeline.defs.partitions import sae_configs
from sae_pipeline.defs.resources import default_resources
from sae_pipeline.defs.sensors import AUTOMATION_SENSOR, automation_sensors

SWEEP = ("sae", "features", "feature_labels")


def test_automation_is_off_unless_asked_and_a_bad_value_names_the_variable(monkeypatch) -> None:
    assert automation_condition({}) is None
    monkeypatch.delenv(ENV_AUTOMATION, raising=False)
    assert automation_condition() is None
    assert isinstance(automation_condition({ENV_AUTOMATION: "eager"}), dg.AutomationCondition)
    with pytest.raises(ConfigError, match=f"{ENV_AUTOMATION}: 'always'; allowed: eager"):
        automation_condition({ENV_AUTOMATION: "always"})
    assert automation_sensors({}) == []
    (sensor,) = automation_sensors({ENV_AUTOMATION: "eager"})  # the opt-in also starts the sensor
    assert sensor.name == AUTOMATION_SENSOR and sensor.default_status == dg.DefaultSensorStatus.RUNNING


def _eager_graph() -> dg.Definitions:
    """The asset graph as the code location builds it with SAE_PIPELINE_AUTOMATION=eager (and the one-line
    condition on `sae` too)."""
    eager = automation_condition({ENV_AUTOMATION: "eager"})
    return dg.Definitions(assets=[corpus, activations, *(asset.with_attributes(automation_condition=eager)
                                                         for asset in (sae, features, feature_labels)),
                                  sweep_analysis, calibration], resources=default_resources())


def _requested(result) -> dict[str, set[str]]:
    return {name: set(result.get_requested_partitions(dg.AssetKey(name))) for name in SWEEP
            if result.get_requested_partitions(dg.AssetKey(name))}


def _landed(instance: dg.DagsterInstance, asset: str, key: str | None = None) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=asset, partition=key))


def test_eager_runs_a_newly_registered_partition_down_the_sweep() -> None:
    graph, instance = _eager_graph(), dg.DagsterInstance.ephemeral()
    _landed(instance, "corpus")
    _landed(instance, "activations")
    result = dg.evaluate_automation_conditions(defs=graph, instance=instance)
    assert result.total_requested == 0  # no partition registered yet; corpus/activations are not automated

    instance.add_dynamic_partitions(sae_configs.name, ["k1"])
    result = dg.evaluate_automation_conditions(defs=graph, instance=instance, cursor=result.cursor)
    assert _requested(result) == {name: {"k1"} for name in SWEEP}  # the whole chain, in one tick
    for asset in SWEEP:
        _landed(instance, asset, "k1")
    result = dg.evaluate_automation_conditions(defs=graph, instance=instance, cursor=result.cursor)
    assert result.total_requested == 0  # done: nothing is asked twice

    instance.add_dynamic_partitions(sae_configs.name, ["k2"])
    result = dg.evaluate_automation_conditions(defs=graph, instance=instance, cursor=result.cursor)
    assert _requested(result) == {name: {"k2"} for name in SWEEP}  # only the new partition

    _landed(instance, "features", "k1")  # features recomputed (e.g. by hand): its labels follow
    result = dg.evaluate_automation_conditions(defs=graph, instance=instance, cursor=result.cursor)
    assert _requested(result) == {"feature_labels": {"k1"}}
