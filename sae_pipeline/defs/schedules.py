"""A schedule (off by default) that backfills config partitions that are missing or whose last run failed."""

import os

import dagster as dg

from sae_pipeline.defs.jobs import sweep_job
from sae_pipeline.defs.partitions import sae_configs

PARTITION_TAG = "dagster/partition"


def partitions_to_run(instance: dg.DagsterInstance) -> list[tuple[str, str]]:
    """(key, run_key) for each registered key with no materialised `sae` whose latest run is not in flight.

    The run_key names the latest run seen (or `never`), so a tick that sees the same failure twice asks once.
    """
    done = instance.get_materialized_partitions(dg.AssetKey("sae"))
    requests = []
    for key in instance.get_dynamic_partitions(sae_configs.name):
        runs = instance.get_runs(dg.RunsFilter(job_name=sweep_job.name, tags={PARTITION_TAG: key}), limit=1)
        latest = runs[0] if runs else None
        if latest is not None and not latest.is_finished:
            continue
        failed = latest is not None and latest.status == dg.DagsterRunStatus.FAILURE
        if key not in done or failed:
            requests.append((key, f"{key}:{latest.run_id if latest else 'never'}"))
    return requests


@dg.schedule(job=sweep_job, cron_schedule=os.environ.get("SAE_PIPELINE_BACKFILL_CRON", "0 * * * *"),
             default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Request runs for sae_configs partitions that are missing or whose last run failed.")
def backfill_schedule(context: dg.ScheduleEvaluationContext):
    requests = partitions_to_run(context.instance)
    if not requests:
        return dg.SkipReason("every registered config partition is materialised or running")
    return [dg.RunRequest(run_key=run_key, partition_key=key) for key, run_key in requests]
