"""The backfill schedule requests exactly the missing and failed config partitions, once per failure."""

from __future__ import annotations

import dagster as dg

from sae_pipeline.definitions import defs
from sae_pipeline.defs.jobs import sweep_job
from sae_pipeline.defs.schedules import backfill_schedule


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
        assert sorted((r.partition_key, r.run_key) for r in requests) == [
            ("failed", f"failed:{failed_run}"), ("missing", "missing:never")]


def test_tick_skips_when_everything_is_done() -> None:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("sae_configs", ["done"])
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="sae", partition="done"))
        result = backfill_schedule(dg.build_schedule_context(instance=instance))
        assert isinstance(result, dg.SkipReason)
