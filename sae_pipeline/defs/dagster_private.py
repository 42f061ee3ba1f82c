"""Every private Dagster name this project uses, in one module, each with why no public API serves (Dagster
1.13). `sae_pipeline_tests/test_dagster_private.py` pins the behaviour relied on, so an upgrade that moves or
changes one fails there, loudly, and not somewhere in a run. Two non-public methods are used too, both in
`runs.py`: `JobDefinition.as_ephemeral_job` (the in-process executor) and `with_logger_defs` (the CLI's console
logger on a location run's job)."""

import dagster as dg
from dagster import AssetCheckEvaluation

# Staleness as the UI shows it (`staleness.py`): Dagster computes it with this resolver over an asset graph
# view, and has no public call that answers "is this partition stale, and why".
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext

# A partition's check evaluation logged by a ranged `sae` step (`checks.py`): `AssetCheckEvaluation` has a
# public name but its target-materialisation field takes this class, which has no public constructor yet.
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

# The provenance tags Dagster writes on a materialisation made from an op's output, which a ranged `sae` run
# writes itself on each partition's materialisation (`staleness.provenance_tags`), and the stale resolver.
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_TAG,
    DEFAULT_DATA_VERSION,
    NULL_EVENT_POINTER,
    CachingStaleStatusResolver,
    StaleStatus,
    compute_logical_data_version,
    get_input_data_version_tag,
    get_input_event_pointer_tag,
)

# A run of the code location `workspace.yaml` loads, executed in this process (`runs.py`): the UI files it under
# its job and can re-execute it, and Ctrl-C stops it in place. `execute_in_process` makes an ephemeral run of no
# location, and launching through the run launcher would execute it in another process.
from dagster._core.definitions.job_base import InMemoryJob
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.definitions.repository_definition.valid_definitions import SINGLETON_REPOSITORY_NAME
from dagster._core.execution.api import create_execution_plan, execute_run
from dagster._core.execution.execute_in_process import merge_run_tags
from dagster._core.execution.execution_result import ExecutionResult
from dagster._core.remote_origin import (
    ManagedGrpcPythonEnvCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)

# The tag a backfill puts on its runs, copied onto a ranged run's own materialisations (`staleness.py`).
from dagster._core.storage.tags import BACKFILL_ID_TAG

# (runs.py) The Python origin of the location's code, which a location run carries.
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

# The clock the stale resolver's temporal context expects (timezone-aware, patchable in Dagster's tests).
from dagster._time import get_current_datetime


class RecordedCheckResult(dg.AssetCheckResult):
    """A check result that Dagster records as one given evaluation, partition included (`recorded_check_result`).

    A ranged `sae` step (`defs/assets/training.py`) must yield an `AssetCheckResult` per check: otherwise Dagster
    logs "did not yield or return expected outputs" for every check, though each partition's evaluation is
    logged. But Dagster turns a yielded result into an evaluation of the step's one partition, and a ranged step
    has none, so the public result would be recorded without its partition. Step execution builds the evaluation
    with `to_asset_check_evaluation` (a method Dagster calls, not one users are meant to override); this result
    returns the evaluation it carries instead."""

    def to_asset_check_evaluation(self, step_context: object) -> AssetCheckEvaluation:  # noqa: ARG002
        return self.__dict__["evaluation"]


def recorded_check_result(evaluation: AssetCheckEvaluation) -> dg.AssetCheckResult:
    """The check result of a step that Dagster records as `evaluation` (a partition's, from a ranged step)."""
    result = RecordedCheckResult(passed=evaluation.passed, asset_key=evaluation.asset_key,
                                 check_name=evaluation.check_name, metadata=evaluation.metadata,
                                 severity=evaluation.severity, description=evaluation.description)
    result.__dict__["evaluation"] = evaluation  # a NamedTuple subclass without __slots__ keeps a __dict__
    return result


__all__ = [
    "BACKFILL_ID_TAG", "CODE_VERSION_TAG", "DATA_VERSION_TAG", "DEFAULT_DATA_VERSION", "NULL_EVENT_POINTER",
    "SINGLETON_REPOSITORY_NAME", "AssetCheckEvaluationTargetMaterializationData", "AssetGraphView",
    "CachingStaleStatusResolver", "ExecutionResult", "InMemoryJob", "LoadableTargetOrigin",
    "ManagedGrpcPythonEnvCodeLocationOrigin", "ReconstructableRepository", "RemoteJobOrigin",
    "RemoteRepositoryOrigin", "StaleStatus", "TemporalContext", "compute_logical_data_version",
    "create_execution_plan", "execute_run", "get_current_datetime", "get_input_data_version_tag",
    "get_input_event_pointer_tag", "merge_run_tags", "recorded_check_result",
]
