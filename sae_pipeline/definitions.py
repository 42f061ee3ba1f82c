"""The Dagster code location: `dagster dev -w workspace.yaml` or `dagster job execute -m sae_pipeline.definitions`."""

import dagster as dg

from sae_pipeline.defs import assets
from sae_pipeline.defs.jobs import analysis_job, ci_job, prepare_job, sweep_job
from sae_pipeline.defs.resources import default_resources
from sae_pipeline.defs.schedules import backfill_schedule

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([assets]),
    jobs=[prepare_job, sweep_job, analysis_job, ci_job],
    schedules=[backfill_schedule],
    resources=default_resources(),
)
