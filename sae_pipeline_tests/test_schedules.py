"""The backfill schedule requests ranged `sae` runs for partitions with no SAE, per-partition downstream runs
where the SAE exists, and the report: each once per failure, nothing for what is in flight."""

from __future__ import annotations

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from sae_pipeline.definitions import defs
from sae_pipeline.defs.jobs import sweep_job
from sae_pipeline.defs.schedules import CRON_ENV, DEFAULT_CRON, backfill_schedule, build_backfill_schedule

SAE = {dg.AssetKey("sae")}
DOWNSTREAM = {dg.AssetKey("features"), dg.AssetKey("feature_labels")}
REPORT = {dg.AssetKey("sweep_analysis"), dg.AssetKey("calibration")}


def _run(instance: dg.DagsterInstance, tags: dict, status: dg.DagsterRunStatus) -> str:
    run = instance.create_run_for_job(job_def=defs.resolve_job_def(sweep_job.name), tags=tags, status=status)
    return run.run_id


def _range(start: str, end: str) -> dict:
    return {ASSET_PARTITION_RANGE_START_TAG: start, ASSET_PARTITION_RANGE_END_TAG: end}


def _by_selection(requests) -> dict[frozenset, list[dg.RunRequest]]:
    grouped: dict[frozenset, list[dg.RunRequest]] = {}
    for request in requests:
        grouped.setdefault(frozenset(request.asset_selection), []).append(request)
    return grouped


def test_tick_requests_ranged_sae_runs_then_downstream_runs() -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("sae_configs", ["trained", "failed", "missing", "labelled", "later"])
        for key in ("trained", "labelled"):
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="sae", partition=key))
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="feature_labels", partition="labelled"))
        failed_run = _run(instance, {"dagster/partition": "failed"}, dg.DagsterRunStatus.FAILURE)
        requests = _by_selection(backfill_schedule(dg.build_schedule_context(instance=instance)))
        ranged, single = sorted(requests[frozenset(SAE)], key=lambda r: r.partition_key or "")
        assert ranged.tags == _range("failed", "missing") and ranged.partition_key is None
        assert ranged.run_key == f"sae:failed..missing:{failed_run}"
        assert single.partition_key == "later"  # not next to the others: its own run
        (downstream,) = requests[frozenset(DOWNSTREAM)]
        assert (downstream.partition_key, downstream.run_key) == ("trained", "trained:never")
        (report,) = requests[frozenset(REPORT)]
        (latest,) = instance.fetch_materializations(dg.AssetKey("sae"), limit=1, ascending=False).records
        assert report.run_key == f"sweep_analysis:{latest.storage_id}"


def test_a_failed_downstream_run_is_asked_again_once() -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("sae_configs", ["refused"])
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="sae", partition="refused"))
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="feature_labels", partition="refused"))
        failed_run = _run(instance, {"dagster/partition": "refused"}, dg.DagsterRunStatus.FAILURE)
        requests = _by_selection(backfill_schedule(dg.build_schedule_context(instance=instance)))
        (downstream,) = requests[frozenset(DOWNSTREAM)]
        assert downstream.run_key == f"refused:{failed_run}"


def test_tick_skips_when_everything_is_done_and_the_report_is_current() -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("sae_configs", ["done"])
        for asset in ("sae", "feature_labels"):
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=asset, partition="done"))
        (report,) = backfill_schedule(dg.build_schedule_context(instance=instance))
        assert report.partition_key is None and report.run_key.startswith("sweep_analysis:")
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="sweep_analysis"))
        result = backfill_schedule(dg.build_schedule_context(instance=instance))
        assert isinstance(result, dg.SkipReason)
        # a partition finishing after the report asks for a new one, under a new run_key
        instance.add_dynamic_partitions("sae_configs", ["later"])
        for asset in ("sae", "feature_labels"):
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=asset, partition="later"))
        (again,) = backfill_schedule(dg.build_schedule_context(instance=instance))
        assert again.run_key != report.run_key


def test_no_request_for_partitions_a_run_or_a_range_is_working_on() -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("sae_configs", ["a", "b", "c", "running"])
        _run(instance, _range("a", "c"), dg.DagsterRunStatus.STARTED)
        _run(instance, {"dagster/partition": "running"}, dg.DagsterRunStatus.STARTING)
        assert isinstance(backfill_schedule(dg.build_schedule_context(instance=instance)), dg.SkipReason)


def test_tick_resolves_against_the_backfill_job() -> None:
    """Through Dagster's own tick evaluation: the ranged, partition and report requests are valid for the job."""
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("sae_configs", ["done", "missing", "missing_too"])
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="sae", partition="done"))
        schedule = defs.resolve_schedule_def("backfill_schedule")
        assert schedule.job_name == "backfill_sweep"
        context = dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def())
        data = schedule.evaluate_tick(context)
        requests = _by_selection(data.run_requests)
        (ranged,) = requests[frozenset(SAE)]
        assert ranged.tags[ASSET_PARTITION_RANGE_START_TAG] == "missing"
        assert ranged.tags[ASSET_PARTITION_RANGE_END_TAG] == "missing_too"
        (downstream,) = requests[frozenset(DOWNSTREAM)]
        assert downstream.tags["dagster/partition"] == "done"


def test_cron_is_configurable(monkeypatch) -> None:
    assert backfill_schedule.cron_schedule == DEFAULT_CRON
    assert backfill_schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert build_backfill_schedule("*/15 * * * *").cron_schedule == "*/15 * * * *"
    monkeypatch.setenv(CRON_ENV, "30 2 * * *")
    assert build_backfill_schedule().cron_schedule == "30 2 * * *"
