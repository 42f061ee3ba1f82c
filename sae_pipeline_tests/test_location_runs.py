"""Runs started by `sae-pipeline run-sweep` are runs of the code location: the web UI files them under their jobs,
places them on the timeline by code location, and re-executes them."""

from __future__ import annotations

import dagster as dg

from sae_pipeline.defs.runs import LOCATION_NAME
from sae_pipeline_tests.conftest import Pipeline
from sae_pipeline_tests.test_stop_and_resume import _home, _run_sweep, _runs
from sae_pipeline_tests.test_webserver import _graphql, running_webserver

JOB_RUNS = """
query ($job: String!, $location: String!) {
  pipelineOrError(params: {pipelineName: $job, repositoryName: "__repository__", repositoryLocationName: $location}) {
    ... on Pipeline { runs { runId } }
    ... on PythonError { message }
  }
}
"""
ALL_RUNS = """
{ runsOrError { ... on Runs { results { runId pipelineName tags { key value }
    repositoryOrigin { repositoryLocationName repositoryName } } } } }
"""
LOCATIONS = "{ workspaceOrError { ... on Workspace { locationEntries { name } } } }"
REEXECUTE = """
mutation ($parent: String!) {
  launchRunReexecution(reexecutionParams: {parentRunId: $parent, strategy: ALL_STEPS}) {
    __typename
    ... on LaunchRunSuccess { run { runId pipelineName repositoryOrigin { repositoryLocationName } } }
    ... on PythonError { message }
    ... on InvalidStepError { invalidStepKey }
  }
}
"""


def test_cli_runs_are_listed_on_their_job_pages_and_can_be_reexecuted(pipeline: Pipeline, tmp_path) -> None:
    env, spec, keys = _home(pipeline, tmp_path, tokens=256 * 10, seeds=[0], ks=[4, 8])
    _run_sweep(env, spec)
    cli_runs = {job: {run.run_id for run in _runs(env, job)} for job in ("train_sweep", "analyze_sweep")}
    assert len(cli_runs["train_sweep"]) == 3 and len(cli_runs["analyze_sweep"]) == 1  # 1 ranged sae + 2 downstream

    with running_webserver(env) as port:
        locations = _graphql(port, LOCATIONS)["data"]["workspaceOrError"]["locationEntries"]
        assert [entry["name"] for entry in locations] == [LOCATION_NAME]
        for job, run_ids in cli_runs.items():
            page = _graphql(port, JOB_RUNS, {"job": job, "location": LOCATION_NAME})["data"]["pipelineOrError"]
            assert {run["runId"] for run in page["runs"]} == run_ids, (job, page)
        for run in _graphql(port, ALL_RUNS)["data"]["runsOrError"]["results"]:
            assert run["repositoryOrigin"] == {"repositoryLocationName": LOCATION_NAME,
                                               "repositoryName": "__repository__"}, run
            assert {"key": "dagster/code_location", "value": LOCATION_NAME} in run["tags"], run
        (analysis,) = cli_runs["analyze_sweep"]
        launched = _graphql(port, REEXECUTE, {"parent": analysis})["data"]["launchRunReexecution"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        assert launched["run"]["pipelineName"] == "analyze_sweep"
        assert launched["run"]["repositoryOrigin"] == {"repositoryLocationName": LOCATION_NAME}
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        child = instance.get_run_by_id(launched["run"]["runId"])
        assert child is not None and child.parent_run_id == analysis
