"""A run over several `sae` partitions (an asset backfill's run, `run-sweep`) trains them as one group, and
still gives every partition its own materialisation, metadata, check evaluations, verdict and failure."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import dagster as dg
import torch
from dagster._core.execution.backfill import PartitionBackfill
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from dagster._core.test_utils import InProcessTestWorkspaceLoadTarget, instance_for_test
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._daemon.backfill import execute_backfill_iteration

from sae_pipeline import publish
from sae_pipeline.config import SAEConfig
from sae_pipeline.defs.assets import SAE_RUN_SIZE, sae
from sae_pipeline.defs.checks import SAE_CHECKS
from sae_pipeline.defs.staleness import is_current, stale_resolver
from sae_pipeline.markdown import round_significant
from sae_pipeline.quality import blocking_failures
from sae_pipeline.results import read_summary
from sae_pipeline.saes import load_sae
from sae_pipeline.store import ActivationStore
from sae_pipeline.training import train_sae
from sae_pipeline_tests.conftest import ALL_ASSETS, Pipeline, tiny_topk

SAE_KEY = dg.AssetKey("sae")


def _ranged(pipeline: Pipeline, keys: list[str]) -> dg.ExecuteInProcessResult:
    return dg.materialize([sae], instance=pipeline.instance, resources=pipeline.resources(),
                          tags={ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]},
                          raise_on_error=False)


def _materializations(pipeline: Pipeline, key: str, run_id: str) -> list[dg.AssetMaterialization]:
    records = pipeline.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=SAE_KEY, asset_partitions=[key]), limit=10).records
    return [r.asset_materialization for r in records if r.run_id == run_id]


def _evaluations(pipeline: Pipeline, run_id: str) -> dict[tuple[str, str], dg.AssetCheckEvaluation]:
    entries = pipeline.instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    return {(e.partition, e.check_name): e for e in (entry.dagster_event.event_specific_data for entry in entries)}


def test_a_ranged_run_trains_one_group_and_materialises_each_partition(pipeline: Pipeline) -> None:
    cfgs = [tiny_topk(k=8), tiny_topk(k=4), tiny_topk(k=8, expansion_factor=4)]
    keys = [pipeline.register(cfg) for cfg in cfgs]
    result = _ranged(pipeline, keys)
    assert result.success
    messages = [entry.user_message for entry in pipeline.instance.all_logs(result.run_id)]
    assert any("group 1/1: 3 configs in one pass" in message for message in messages)
    assert not [message for message in messages if "did not yield or return expected outputs" in message]
    logged = pipeline.instance.all_logs(result.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    assert len(logged) == len(keys) * len(SAE_CHECKS)  # one per partition and check: none twice, none unpartitioned
    evaluations = _evaluations(pipeline, result.run_id)
    for key, cfg in zip(keys, cfgs, strict=True):
        (materialization,) = _materializations(pipeline, key, result.run_id)
        summary = read_summary(pipeline.layout, key)
        assert materialization.metadata["fvu"].value == round_significant(summary["metrics"]["fvu"], 4)
        assert {name for partition, name in evaluations if partition == key} == {s.name for s in SAE_CHECKS}
        assert blocking_failures(pipeline.layout.sae_dir(key)) == []
        alone = train_sae(cfg, ActivationStore(pipeline.layout.activations_dir), "cpu")
        saved = load_sae(pipeline.layout.sae_dir(key)).state_dict()
        for name, value in alone.sae.state_dict().items():
            assert torch.allclose(saved[name], value, atol=1e-5, rtol=0), (key, name)
    fvus = {_materializations(pipeline, k, result.run_id)[0].metadata["fvu"].value for k in keys}
    assert len(fvus) == 3  # each partition's own numbers, not one copy for the range
    resolver = stale_resolver(pipeline.instance, dg.Definitions(assets=ALL_ASSETS, resources=pipeline.resources()))
    assert all(is_current(resolver, "sae", key) for key in keys)  # provenance as a single-partition run's


def test_each_check_evaluation_targets_its_own_partitions_materialisation(pipeline: Pipeline) -> None:
    keys = [pipeline.register(tiny_topk(k=k, train_tokens=256 * 20)) for k in (3, 5)]
    result = _ranged(pipeline, keys)
    assert result.success
    evaluations = _evaluations(pipeline, result.run_id)
    for key in keys:
        storage_id = pipeline.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=SAE_KEY, asset_partitions=[key]), limit=1).records[0].storage_id
        assert {evaluations[(key, s.name)].target_materialization_data.storage_id for s in SAE_CHECKS} == {storage_id}


def test_a_failed_config_fails_only_its_own_partition(pipeline: Pipeline) -> None:
    healthy = pipeline.register(tiny_topk(k=6))
    collapsed = pipeline.register(SAEConfig(architecture="relu", expansion_factor=2, l1_alpha=100.0, lr=0.05,
                                            batch_size=256, train_tokens=256 * 60, log_every=10,
                                            dead_tokens=256 * 20))
    unregistered = "topk_exp2_k7_not_registered"
    pipeline.instance.add_dynamic_partitions("sae_configs", [unregistered])
    keys = [healthy, collapsed, unregistered]
    result = _ranged(pipeline, keys)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    message = failure.step_failure_data.error.message
    assert "2 of 3 sae partitions failed" in message
    assert f"{collapsed}: failed blocking checks: sae_not_collapsed" in message
    assert f"{unregistered}: partition key {unregistered}: not registered" in message
    assert healthy not in message.split("failed (the others")[1]

    assert len(_materializations(pipeline, healthy, result.run_id)) == 1
    assert len(_materializations(pipeline, collapsed, result.run_id)) == 1  # published, with its verdict
    assert _materializations(pipeline, unregistered, result.run_id) == []
    evaluations = _evaluations(pipeline, result.run_id)
    assert evaluations[(healthy, "sae_not_collapsed")].passed
    assert not evaluations[(collapsed, "sae_not_collapsed")].passed
    assert blocking_failures(pipeline.layout.sae_dir(collapsed)) != []


def test_an_asset_backfill_of_ten_partitions_launches_two_sae_runs(tmp_path: Path) -> None:
    """The backfill daemon's own first iteration, on the real code location, with a launcher that only records:
    `sae` goes first, in ranged runs of at most SAE_RUN_SIZE partitions; its downstream waits for it."""
    keys = [f"topk_exp2_k{k}_backfilled" for k in range(1, 11)]
    launcher = {"module": "dagster._core.test_utils", "class": "MockedRunLauncher"}
    with instance_for_test(temp_dir=str(tmp_path), overrides={"run_launcher": launcher}) as instance:
        instance.add_dynamic_partitions("sae_configs", keys)
        origin = InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name="sae_pipeline.definitions",
                                                                  working_directory=str(Path.cwd())))
        with WorkspaceProcessContext(instance, InProcessTestWorkspaceLoadTarget(origin)) as workspace:
            backfill = PartitionBackfill.from_asset_partitions(
                backfill_id="sweep", asset_graph=workspace.create_request_context().asset_graph,
                partition_names=keys, asset_selection=[dg.AssetKey(a) for a in ("sae", "features", "feature_labels")],
                backfill_timestamp=time.time(), tags={}, dynamic_partitions_store=instance, all_partitions=False,
                title=None, description=None, run_config=None)
            instance.add_backfill(backfill)
            list(execute_backfill_iteration(workspace, logging.getLogger("backfill")))
        runs = instance.get_runs()
    assert SAE_RUN_SIZE == 8
    assert sorted((run.tags[ASSET_PARTITION_RANGE_START_TAG], run.tags[ASSET_PARTITION_RANGE_END_TAG])
                  for run in runs) == [(keys[0], keys[7]), (keys[8], keys[9])]
    assert all(run.asset_selection == {SAE_KEY} for run in runs)


def test_a_partition_that_fails_to_publish_fails_alone(pipeline: Pipeline, monkeypatch) -> None:
    keys = [pipeline.register(tiny_topk(k=k, train_tokens=256 * 20)) for k in (2, 9)]
    original = publish.evaluate_sae

    def fails_for_k9(autoencoder, *args, **kwargs):
        if autoencoder.k == 9:
            raise OSError("planted: the eval shards went away")
        return original(autoencoder, *args, **kwargs)

    monkeypatch.setattr(publish, "evaluate_sae", fails_for_k9)
    result = _ranged(pipeline, keys)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert f"{keys[1]}: publishing failed (OSError: planted" in failure.step_failure_data.error.message
    assert len(_materializations(pipeline, keys[0], result.run_id)) == 1
    assert _materializations(pipeline, keys[1], result.run_id) == []
