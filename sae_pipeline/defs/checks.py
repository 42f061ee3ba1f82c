"""Asset checks: specs declared on the assets (so each evaluates only its own partition) and results built from
the core's pure check outcomes (`sae_pipeline.quality`). Every spec is blocking: a failed ERROR check stops
downstream steps in the run, a failed WARN check only flags. Thresholds come from the `quality` resource.

The checks of partitioned assets are partitioned too, so the UI shows status and history per config partition.
A ranged `sae` run (several partitions in one step) builds one evaluation per partition itself
(`check_evaluations`): Dagster attaches a partition to an `AssetCheckResult` only in a single-partition step. It
logs each but the last partition's, which it yields as the step's check outputs (`recorded_check_result`), so
Dagster expects no other output and the job graph shows the latest partition's verdicts.
"""

import math
import warnings
from typing import Any

import dagster as dg

from sae_pipeline.checks import Asset, checks_of
from sae_pipeline.defs.dagster_private import AssetCheckEvaluationTargetMaterializationData
from sae_pipeline.defs.partitions import sae_configs
from sae_pipeline.lineage import LINEAGE_FILE, lineage_mismatch
from sae_pipeline.markdown import rounded
from sae_pipeline.quality import CheckOutcome
from sae_pipeline.storage import CORPUS_FILE, Layout

PARTITIONED_ASSETS = {"sae", "features"}


def _blocking(name: str, asset: str, description: str) -> dg.AssetCheckSpec:
    partitions = sae_configs if asset in PARTITIONED_ASSETS else None
    with warnings.catch_warnings():  # partitioned checks are a preview in Dagster 1.13; used knowingly
        warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec")
        return dg.AssetCheckSpec(name, asset=asset, blocking=True, description=description,
                                 partitions_def=partitions)


def check_specs(asset: Asset) -> list[dg.AssetCheckSpec]:
    """The Dagster specs of an asset's checks, from the core's one table (`sae_pipeline.checks.CHECKS`)."""
    return [_blocking(check.name, check.asset, check.description) for check in checks_of(asset)]


ACTIVATIONS_CHECKS = check_specs("activations")
SAE_CHECKS = check_specs("sae")
FEATURES_CHECKS = check_specs("features")


def _metadata_value(value: Any) -> Any:
    """Dagster metadata takes JSON-like values; floats read to 4 significant digits (as in the assets' metadata;
    the description and the stored verdict keep what was measured), a NaN/Inf float as text, None as 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return rounded(value)


def check_result(outcome: CheckOutcome, partition: str | None = None) -> dg.AssetCheckResult:
    """A core check outcome as a Dagster check result; metadata carries the measurement, threshold and verdict,
    and the partition of a partitioned check: a run's event log shows an evaluation's metadata, not its partition,
    and a ranged `sae` run logs the evaluations of several partitions."""
    verdict = "passed" if outcome.passed else f"failed ({outcome.severity})"
    metadata = {"verdict": verdict, **({"partition": partition} if partition else {}),
                **{k: _metadata_value(v) for k, v in outcome.metadata.items()}}
    return dg.AssetCheckResult(check_name=outcome.name, passed=outcome.passed,
                               severity=dg.AssetCheckSeverity[outcome.severity],
                               description=outcome.description, metadata=metadata)


def check_evaluations(instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str,
                      outcomes: list[CheckOutcome]) -> list[dg.AssetCheckEvaluation]:
    """Core check outcomes as the evaluations of one partition, tied to that partition's latest
    materialisation (the one just logged), looked up once."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1).records
    target = (AssetCheckEvaluationTargetMaterializationData(run_id=records[0].run_id, storage_id=records[0].storage_id,
                                                            timestamp=records[0].timestamp) if records else None)
    results = [check_result(outcome, partition) for outcome in outcomes]
    return [dg.AssetCheckEvaluation(asset_key=asset_key, check_name=outcome.name, passed=result.passed,
                                    metadata=result.metadata, severity=result.severity,
                                    description=result.description, blocking=True, partition=partition,
                                    target_materialization_data=target)
            for outcome, result in zip(outcomes, results, strict=True)]


def refuse_if_blocked(asset: str, key: str | None, reasons: list[str]) -> None:
    """Raise a Failure (shown in the UI) when upstream verdicts hold failed blocking checks."""
    if reasons:
        where = f"partition {key}" if key else "this run"
        raise dg.Failure(description=f"Refusing to materialise {asset} for {where}: blocking quality checks "
                         "failed upstream: " + "; ".join(reasons),
                         metadata={"reasons": "\n".join(reasons)}, allow_retries=False)


def refuse_if_other_lineage(asset: str, layout: Layout, model: str | None = None) -> None:
    """Raise a Failure at the asset's start when the activation store was made from another corpus (or model)."""
    problem = lineage_mismatch(layout.pull(layout.activations_dir, LINEAGE_FILE),
                               layout.pull(layout.corpus_dir, CORPUS_FILE), model)
    if problem:
        raise dg.Failure(description=f"Refusing to materialise {asset}: {problem}", allow_retries=False)
