"""The Dagster code location: `dagster dev -w workspace.yaml` or `dagster job execute -m sae_pipeline.definitions`."""

import dagster as dg

from sae_pipeline.defs import assets, synthetic
from sae_pipeline.defs.jobs import analysis_job, ci_job, prepare_job, sweep_job
from sae_pipeline.defs.profiles import k8s_executor, profile
from sae_pipeline.defs.resources import default_resources
from sae_pipeline.defs.schedules import backfill_job, backfill_schedule
from sae_pipeline.defs.sensors import automation_sensors, calibration_sensor, sweep_files_sensor
from sae_pipeline.defs.synthetic import synthetic_job

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([assets, synthetic]),
    jobs=[prepare_job, sweep_job, analysis_job, ci_job, backfill_job, synthetic_job],
    schedules=[backfill_schedule],
    sensors=[sweep_files_sensor, calibration_sensor, *automation_sensors()],
    resources=default_resources(),
    executor=k8s_executor() if profile() == "k8s" else None,
)
