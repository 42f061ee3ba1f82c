"""Pins the private Dagster names in `sae_pipeline/defs/dagster_private.py`: where they live, the arguments the
project passes and the tag strings already written in users' instances. A Dagster upgrade that changes one
fails here, naming it, before any run does."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import dagster as dg
import pytest

from sae_pipeline.defs import dagster_private as private


def _parameters(function: Callable) -> set[str]:
    return set(inspect.signature(function).parameters)


def test_every_private_name_still_imports() -> None:
    assert [name for name in private.__all__ if not hasattr(private, name)] == []


@pytest.mark.parametrize(("function", "used"), [
    (private.create_execution_plan, {"run_config", "instance_ref"}),
    (private.AssetGraphView, {"temporal_context", "instance", "asset_graph"}),
    (private.CachingStaleStatusResolver, {"instance", "asset_graph", "loading_context"}),
    (private.CachingStaleStatusResolver.get_status, {"key", "partition_key"}),
    (private.CachingStaleStatusResolver.get_stale_causes, {"key", "partition_key"}),
    (private.ReconstructableRepository.for_module, {"module", "fn_name", "working_directory"}),
    (private.ManagedGrpcPythonEnvCodeLocationOrigin, {"loadable_target_origin", "location_name"}),
    (private.InMemoryJob.get_subset, {"asset_selection"}),
    (dg.JobDefinition.as_ephemeral_job, {"resource_defs", "input_values"}),
    (dg.JobDefinition.with_logger_defs, {"logger_defs"}),
], ids=lambda item: getattr(item, "__qualname__", ""))
def test_the_arguments_we_pass_are_still_accepted(function: Callable, used: set[str]) -> None:
    assert used <= _parameters(function), sorted(used - _parameters(function))


def test_the_records_we_build_take_the_fields_we_give() -> None:
    context = private.TemporalContext(effective_dt=private.get_current_datetime(), last_event_id=None)
    assert context.effective_dt.tzinfo is not None
    target = private.AssetCheckEvaluationTargetMaterializationData(run_id="r", storage_id=7, timestamp=1.0)
    assert (target.run_id, target.storage_id, target.timestamp) == ("r", 7, 1.0)
    origin = private.LoadableTargetOrigin(executable_path=sys.executable, module_name="m", working_directory="/")
    assert (origin.module_name, origin.working_directory) == ("m", "/")


def test_positional_signatures_we_call_positionally() -> None:
    assert len(inspect.signature(private.merge_run_tags).parameters) == 6  # job, partition, tags, selection, ...
    assert list(inspect.signature(private.execute_run).parameters)[:3] == ["job", "dagster_run", "instance"]
    assert len(inspect.signature(private.RemoteJobOrigin).parameters) >= 2
    assert len(inspect.signature(private.RemoteRepositoryOrigin).parameters) >= 2


def test_tag_strings_written_in_existing_instances_are_unchanged() -> None:
    key = dg.AssetKey("activations")
    assert private.CODE_VERSION_TAG == "dagster/code_version"
    assert private.DATA_VERSION_TAG == "dagster/data_version"
    assert private.BACKFILL_ID_TAG == "dagster/backfill"
    assert private.get_input_data_version_tag(key) == "dagster/input_data_version/activations"
    assert private.get_input_event_pointer_tag(key) == "dagster/input_event_pointer/activations"
    assert private.SINGLETON_REPOSITORY_NAME == "__repository__"


def test_the_logical_data_version_depends_on_the_code_version_and_every_input() -> None:
    inputs = {dg.AssetKey("activations"): dg.DataVersion("a")}
    version = private.compute_logical_data_version("2", inputs)
    assert version == private.compute_logical_data_version("2", dict(inputs))  # deterministic
    assert version != private.compute_logical_data_version("3", inputs)
    assert version != private.compute_logical_data_version("2", {dg.AssetKey("activations"):
                                                                  dg.DataVersion("b")})
    assert private.StaleStatus.FRESH.value == "FRESH"


def test_a_recorded_check_result_is_the_ranged_steps_check_output_with_its_partition() -> None:
    import warnings

    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    parts = dg.StaticPartitionsDefinition(["a", "b"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec")
        spec = dg.AssetCheckSpec("ok", asset="toy", blocking=True, partitions_def=parts)

    @dg.multi_asset(specs=[dg.AssetSpec("toy")], check_specs=[spec], partitions_def=parts, can_subset=True)
    def toy(context):  # noqa: ANN001 (Dagster reads the annotation, which the future import makes a string)
        for key in context.partition_keys:
            yield dg.AssetMaterialization(asset_key="toy", partition=key)
        yield private.recorded_check_result(dg.AssetCheckEvaluation(
            asset_key=dg.AssetKey("toy"), check_name="ok", passed=True, partition="b"))

    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([toy], instance=instance, tags={ASSET_PARTITION_RANGE_START_TAG: "a",
                                                                ASSET_PARTITION_RANGE_END_TAG: "b"})
        assert result.success
        logs = instance.all_logs(result.run_id)
        evaluations = [entry.dagster_event.event_specific_data for entry in logs if entry.dagster_event
                       and entry.dagster_event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION]
        assert [(e.partition, e.check_name, e.passed) for e in evaluations] == [("b", "ok", True)]
        assert not [e for e in logs if "did not yield or return expected outputs" in e.user_message]
