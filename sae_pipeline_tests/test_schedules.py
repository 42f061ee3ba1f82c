"""The backfill schedule requests exactly the missing and failed config partitions, once per failure."""

from __future__ import annotations

import dagster as dg

from sae_pipeline.definitions import defs
from sae_pipeline.defs.jobs import sweep_job
from sae_pipeline.defs.schedules import CRON_ENV, DEFAULT_CRON, backfill_schedule, build_backfill_schedule


def _failed_run(instance: dg.DagsterInstance, key: str) -> str:
    run = instance.create_run_for_job(job_def=defs.resolve_job_def(sweep_job.name),
                                      tags={"dagster/partition": key})
    instance.report_run_failed(run)
    return run.run_id


def test_tick_requests_missing_and_failed_partitions() -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("sae_configs", ["done", "failed", "missing"])
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="sae", partition="done"))
        failed_run = _failed_run(instance, "failed")
        context = dg.build_schedule_context(instance=instance)
        requests = backfill_schedule(context)
        partitioned = [r for r in requests if r.partition_key is not None]
        assert sorted((r.partition_key, r.run_key) for r in partitioned) == [
            ("failed", f"failed:{failed_run}"), ("missing", "missing:never")]
        assert all(set(r.asset_selection) == {dg.AssetKey(n) for n in ("sae", "features", "feature_labels")}
                   for r in partitioned)
        # then the report, once per newest finished partition
        (report,) = [r for r in requests if r.partition_key is None]
        (latest,) = instance.fetch_materializations(dg.AssetKey("sae"), limit=1, ascending=False).records
        assert report.run_key == f"sweep_analysis:{latest.storage_id}"
        assert set(report.asset_selection) == {dg.AssetKey("sweep_analysis"), dg.AssetKey("calibration")}


def test_tick_skips_when_everything_is_done_and_the_report_is_current() -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("sae_configs", ["done"])
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="sae", partition="done"))
        (report,) = backfill_schedule(dg.build_schedule_context(instance=instance))
        assert report.partition_key is None and report.run_key.startswith("sweep_analysis:")
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="sweep_analysis"))
        result = backfill_schedule(dg.build_schedule_context(instance=instance))
        assert isinstance(result, dg.SkipReason)
        # a partition finishing after the report asks for a new one, under a new run_key
        instance.add_dynamic_partitions("sae_configs", ["later"])
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="sae", partition="later"))
        (again,) = backfill_schedule(dg.build_schedule_context(instance=instance))
        assert again.run_key != report.run_key


def test_no_request_while_a_partition_run_is_in_flight() -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("sae_configs", ["running"])
        instance.create_run_for_job(job_def=defs.resolve_job_def(sweep_job.name), tags={"dagster/partition": "running"},
                                    status=dg.DagsterRunStatus.STARTED)
        assert isinstance(backfill_schedule(dg.build_schedule_context(instance=instance)), dg.SkipReason)


def test_tick_resolves_against_the_backfill_job() -> None:
    """Through Dagster's own tick evaluation: the partition and report requests are valid for the target job."""
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("sae_configs", ["done", "missing"])
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="sae", partition="done"))
        schedule = defs.resolve_schedule_def("backfill_schedule")
        assert schedule.job_name == "backfill_sweep"
        context = dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def())
        data = schedule.evaluate_tick(context)
        by_partition = {r.partition_key: r for r in data.run_requests}
        assert set(by_partition) == {"missing", None}
        assert by_partition["missing"].tags["dagster/partition"] == "missing"


def test_cron_is_configurable(monkeypatch) -> None:
    assert backfill_schedule.cron_schedule == DEFAULT_CRON
    assert backfill_schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert build_backfill_schedule("*/15 * * * *").cron_schedule == "*/15 * * * *"
    monkeypatch.setenv(CRON_ENV, "30 2 * * *")
    assert build_backfill_schedule().cron_schedule == "30 2 * * *"
