"""Steps over one partition or a range of them (an asset backfill's run, `run-sweep`): `sae`, `features` and
`feature_labels` load what their partitions share once, and still give every partition its own
materialisation, metadata, check evaluations and failure.

Dagster ties a `MaterializeResult` (the step's output, which downstream steps of the run wait for) to a partition
only in a single-partition step. In a ranged step each partition is an `AssetMaterialization` the step logs with
its provenance tags, and the step yields no output: a downstream step in the same run would be skipped, so each
of these assets has its own backfill policy (Dagster never runs assets with different policies in one run).
"""

from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg

from sae_pipeline.defs.checks import check_evaluations, check_result
from sae_pipeline.defs.dagster_private import recorded_check_result
from sae_pipeline.quality import CheckOutcome


class HeldChecks:
    """A ranged step's check evaluations, the latest partition's held back. Dagster expects a check result per
    check from the step, or it logs "did not yield or return expected outputs" for each: the last partition's
    evaluations become those results (`recorded_check_result`), and every earlier partition's are logged as
    soon as the next one is published, the next group starts, or the step stops."""

    def __init__(self, context: dg.AssetExecutionContext) -> None:
        self.context, self.held = context, []

    def hold(self, evaluations: list[dg.AssetCheckEvaluation]) -> None:
        self.log()
        self.held = evaluations

    def log(self) -> None:
        for evaluation in self.held:
            self.context.log_event(evaluation)
        self.held = []

    def as_outputs(self) -> list[dg.AssetCheckResult]:
        outputs, self.held = [recorded_check_result(evaluation) for evaluation in self.held], []
        return outputs


def partition_materialisation(context: dg.AssetExecutionContext, asset_key: dg.AssetKey, key: str,
                              metadata: dict[str, Any], outcomes: list[CheckOutcome], tags: dict[str, str]
                              ) -> Generator[dg.MaterializeResult | dg.AssetMaterialization, None,
                                             list[dg.AssetCheckEvaluation]]:
    """One partition's materialisation and check results: in a single-partition step the step's output with its
    check results; in a ranged step an `AssetMaterialization`, whose check evaluations are returned for the
    caller to hold (`HeldChecks`)."""
    if context.has_partition_key:
        yield dg.MaterializeResult(asset_key=asset_key, metadata=metadata,
                                   check_results=[check_result(o, key) for o in outcomes])
        return []
    yield dg.AssetMaterialization(asset_key=asset_key, partition=key, metadata=metadata, tags=tags)
    return check_evaluations(context.instance, asset_key, key, outcomes) if outcomes else []


@contextmanager
def own_failure(context: dg.AssetExecutionContext, key: str, failures: dict[str, str]) -> Iterator[None]:
    """In a ranged step an error of one partition is recorded in `failures` and the step goes on with the next;
    in a single-partition step it fails the step as it is (its retry policy included). A stop is never caught."""
    try:
        yield
    except Exception as error:
        if context.has_partition_key:
            raise
        failures[key] = error.description if isinstance(error, dg.Failure) else f"{type(error).__name__}: {error}"
        context.log.warning(f"{context.op_def.name} {key} failed: {failures[key]}")


def fail_partitions(asset: str, failures: dict[str, str], n_keys: int, allow_retries: bool = True) -> None:
    """End a ranged step that had failed partitions: one Failure naming each and why (a backfill marks only
    those failed; the others are materialised)."""
    if failures:
        lines = [f"{key}: {why}" for key, why in failures.items()]
        raise dg.Failure(description=f"{len(failures)} of {n_keys} {asset} partitions failed (the others are "
                         "materialised): " + "; ".join(lines), metadata={"failed": "\n".join(lines)},
                         allow_retries=allow_retries)
