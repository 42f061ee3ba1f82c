"""A schedule (off by default) that backfills config partitions: ranged `sae` runs for the partitions that have
no trained SAE (each run trains its configs as groups in one pass, as an asset backfill would), then
`features` + `feature_labels` per partition once its SAE exists, then the sweep report (`analyze_sweep`:
sweep_analysis + calibration) over what has finished. A partition goes from missing to labelled over two ticks."""

import os

import dagster as dg

from sae_pipeline.defs.assets import SAE_RUN_SIZE, calibration, feature_labels, features, sae, sweep_analysis
from sae_pipeline.defs.jobs import sweep_job
from sae_pipeline.defs.partitions import key_ranges, sae_configs

PARTITION_TAG = "dagster/partition"
RANGE_START_TAG = "dagster/asset_partition_range_start"
"""Documented run tag: first partition key of a ranged run."""
RANGE_END_TAG = "dagster/asset_partition_range_end"
"""Documented run tag: last partition key of a ranged run."""
DEFAULT_CRON = "0 * * * *"
CRON_ENV = "SAE_PIPELINE_BACKFILL_CRON"
PARTITION_ASSETS = [sae, features, feature_labels]
DOWNSTREAM_ASSETS = [features, feature_labels]
REPORT_ASSETS = [sweep_analysis, calibration]
IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]

backfill_job = dg.define_asset_job(
    "backfill_sweep", selection=[*PARTITION_ASSETS, *REPORT_ASSETS],
    description="Target of backfill_schedule: ranged sae runs, per-partition features/feature_labels runs, and "
                "report runs of sweep_analysis + calibration (each run request selects one of the three).")
PARTITION_JOBS = (sweep_job.name, backfill_job.name)
"""Jobs whose runs count as attempts at a partition."""


def latest_partition_run(instance: dg.DagsterInstance, key: str) -> dg.DagsterRun | None:
    """The newest single-partition run of train_sweep or backfill_sweep tagged with partition `key`."""
    runs = instance.get_runs(dg.RunsFilter(tags={PARTITION_TAG: key}), limit=50)
    return next((run for run in runs if run.job_name in PARTITION_JOBS), None)


def run_partitions(run: dg.DagsterRun, ordered: list[str]) -> set[str]:
    """The config partitions a run targets: its partition, or every key of its range (in partition order)."""
    if PARTITION_TAG in run.tags:
        return {run.tags[PARTITION_TAG]}
    start, end = run.tags.get(RANGE_START_TAG), run.tags.get(RANGE_END_TAG)
    if start in ordered and end in ordered:
        return set(ordered[ordered.index(start):ordered.index(end) + 1])
    return set()


def busy_partitions(instance: dg.DagsterInstance, ordered: list[str]) -> set[str]:
    """Partitions targeted by a run that has not finished (from this schedule, a backfill or the CLI)."""
    return {key for run in instance.get_runs(dg.RunsFilter(statuses=IN_FLIGHT)) for key in run_partitions(run, ordered)}


def latest_attempt(instance: dg.DagsterInstance) -> str:
    """The newest finished run of a partition job (or `never`): a failed range is asked for again only after
    some run has finished since, so a tick that sees the same failure twice asks once."""
    finished = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
    runs = instance.get_runs(dg.RunsFilter(statuses=finished), limit=200)
    return next((run.run_id for run in runs if run.job_name in PARTITION_JOBS), "never")


def sae_requests(instance: dg.DagsterInstance, ordered: list[str], busy: set[str]) -> list[dg.RunRequest]:
    """Ranged `sae` runs (at most SAE_RUN_SIZE partitions each) for the partitions with no trained SAE."""
    done = instance.get_materialized_partitions(sae.key)
    todo = {key for key in ordered if key not in done and key not in busy}
    attempt = latest_attempt(instance)
    requests = []
    for keys in key_ranges(ordered, todo, SAE_RUN_SIZE):
        where = ({"partition_key": keys[0]} if len(keys) == 1 else
                 {"tags": {RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]}})
        requests.append(dg.RunRequest(run_key=f"sae:{keys[0]}..{keys[-1]}:{attempt}", asset_selection=[sae.key],
                                      **where))
    return requests


def downstream_requests(instance: dg.DagsterInstance, ordered: list[str], busy: set[str]) -> list[dg.RunRequest]:
    """Per-partition features + feature_labels runs where the SAE exists but the labels are missing, or the
    partition's latest run failed; the run_key names that run (or `never`), so each failure is asked once."""
    trained = instance.get_materialized_partitions(sae.key)
    labelled = instance.get_materialized_partitions(feature_labels.key)
    requests = []
    for key in ordered:
        if key not in trained or key in busy:
            continue
        latest = latest_partition_run(instance, key)
        failed = latest is not None and latest.status == dg.DagsterRunStatus.FAILURE
        if key not in labelled or failed:
            requests.append(dg.RunRequest(run_key=f"{key}:{latest.run_id if latest else 'never'}", partition_key=key,
                                          asset_selection=[a.key for a in DOWNSTREAM_ASSETS]))
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
    """The sae requests, the downstream requests, then the report request (over whatever has finished; it
    tolerates missing ones)."""
    ordered = instance.get_dynamic_partitions(sae_configs.name)
    busy = busy_partitions(instance, ordered)
    requests = [*sae_requests(instance, ordered, busy), *downstream_requests(instance, ordered, busy)]
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
                 description="Request ranged sae runs for sae_configs partitions with no SAE, features + labels "
                             "runs where the SAE exists, then sweep_analysis + calibration. Cron: "
                             "$SAE_PIPELINE_BACKFILL_CRON (default hourly).")
    def _schedule(context: dg.ScheduleEvaluationContext):
        requests = backfill_requests(context.instance)
        if not requests:
            return dg.SkipReason("every config partition is materialised or running, and the report is current")
        return requests

    return _schedule


backfill_schedule = build_backfill_schedule()
