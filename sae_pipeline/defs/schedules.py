"""A schedule (off by default) that backfills config partitions that are missing or whose last run failed, then
requests the sweep report (`analyze_sweep`: sweep_analysis + calibration) over what has finished."""

import os

import dagster as dg

from sae_pipeline.defs.assets import calibration, feature_labels, features, sae, sweep_analysis
from sae_pipeline.defs.jobs import sweep_job
from sae_pipeline.defs.partitions import sae_configs

PARTITION_TAG = "dagster/partition"
DEFAULT_CRON = "0 * * * *"
CRON_ENV = "SAE_PIPELINE_BACKFILL_CRON"
PARTITION_ASSETS = [sae, features, feature_labels]
REPORT_ASSETS = [sweep_analysis, calibration]

backfill_job = dg.define_asset_job(
    "backfill_sweep", selection=[*PARTITION_ASSETS, *REPORT_ASSETS],
    description="Target of backfill_schedule: per-partition runs of sae/features/feature_labels, and report runs "
                "of sweep_analysis + calibration (each run request selects one of the two).")
PARTITION_JOBS = (sweep_job.name, backfill_job.name)
"""Jobs whose runs count as attempts at a partition."""


def latest_partition_run(instance: dg.DagsterInstance, key: str) -> dg.DagsterRun | None:
    """The newest run of train_sweep or backfill_sweep tagged with partition `key`."""
    runs = instance.get_runs(dg.RunsFilter(tags={PARTITION_TAG: key}), limit=50)
    return next((run for run in runs if run.job_name in PARTITION_JOBS), None)


def partitions_to_run(instance: dg.DagsterInstance) -> list[tuple[str, str]]:
    """(key, run_key) for each registered key with no materialised `sae` whose latest run is not in flight.

    The run_key names the latest run seen (or `never`), so a tick that sees the same failure twice asks once.
    """
    done = instance.get_materialized_partitions(dg.AssetKey("sae"))
    requests = []
    for key in instance.get_dynamic_partitions(sae_configs.name):
        latest = latest_partition_run(instance, key)
        if latest is not None and not latest.is_finished:
            continue
        failed = latest is not None and latest.status == dg.DagsterRunStatus.FAILURE
        if key not in done or failed:
            requests.append((key, f"{key}:{latest.run_id if latest else 'never'}"))
    return requests


def report_run_key(instance: dg.DagsterInstance) -> str | None:
    """run_key of the report request: the storage id of the newest `sae` materialisation (None if there is none).

    The report is requested once per new finished partition (and not at all when the latest report is newer):
    a tick with nothing new asks nothing again.
    """
    event = _latest_storage_id(instance, sae.key)
    if event is None:
        return None
    report = _latest_storage_id(instance, sweep_analysis.key)
    if report is not None and report > event:
        return None  # the report already covers the newest partition
    return f"sweep_analysis:{event}"


def _latest_storage_id(instance: dg.DagsterInstance, key: dg.AssetKey) -> int | None:
    records = instance.fetch_materializations(key, limit=1, ascending=False).records
    return records[0].storage_id if records else None


def backfill_requests(instance: dg.DagsterInstance) -> list[dg.RunRequest]:
    """The partition requests, then the report request (over whatever has finished; it tolerates missing ones)."""
    requests = [dg.RunRequest(run_key=run_key, partition_key=key, asset_selection=[a.key for a in PARTITION_ASSETS])
                for key, run_key in partitions_to_run(instance)]
    report_key = report_run_key(instance)
    if report_key is not None:
        requests.append(dg.RunRequest(run_key=report_key, asset_selection=[a.key for a in REPORT_ASSETS]))
    return requests


def build_backfill_schedule(cron_schedule: str | None = None,
                            default_status: dg.DefaultScheduleStatus = dg.DefaultScheduleStatus.STOPPED
                            ) -> dg.ScheduleDefinition:
    """The backfill schedule on `cron_schedule` (default: $SAE_PIPELINE_BACKFILL_CRON, else hourly)."""
    cron = cron_schedule or os.environ.get(CRON_ENV, DEFAULT_CRON)

    @dg.schedule(name="backfill_schedule", job=backfill_job, cron_schedule=cron, default_status=default_status,
                 description="Request runs for sae_configs partitions that are missing or whose last run failed, "
                             "then sweep_analysis + calibration. Cron: $SAE_PIPELINE_BACKFILL_CRON (default hourly).")
    def _schedule(context: dg.ScheduleEvaluationContext):
        requests = backfill_requests(context.instance)
        if not requests:
            return dg.SkipReason("every config partition is materialised or running, and the report is current")
        return requests

    return _schedule


backfill_schedule = build_backfill_schedule()
